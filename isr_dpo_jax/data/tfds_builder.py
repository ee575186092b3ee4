"""A TFDS dataset of records with their videos decoded once, in array_record.

Big runs read each video many times (two samples, the context, the judge,
training epochs, every iteration). This builder decodes it once: each example
holds a record of a jsonl file (any of the formats of records.py, kept whole
as JSON text) and the T frames sampled from its video, resized and
center-cropped to a fixed size (uint8, zlib-compressed). TensorFlow is not
needed: TFDS writes array_record files and reads them back as a
random-access data source, which grain consumes (loader.py).

Bad records and videos that cannot be decoded are skipped, logged and
counted in `builder.reports[split]`; past `max_error_rate` the build stops.

  builder = VideoRecords(data_dir=..., splits={"train": "qa.jsonl"},
                         kind="qa", video_root=...)
  builder.download_and_prepare()
  source = Source(data_dir, "train")  # (record, frames) by index
"""
from collections.abc import Iterator, Mapping, Sequence
import concurrent.futures
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from isr_dpo_jax.data import records
from isr_dpo_jax.data import video


class VideoRecords(tfds.core.GeneratorBasedBuilder):
  """jsonl records and their videos' frames (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records as JSON text, frames uint8 [T, S, S, 3]."}
  # Inputs are local files, so there is no checksums file to look up next to
  # this module. Looking would import `importlib_resources`, which TFDS 4.9
  # uses but no longer installs on Python >= 3.9.
  code_path = None

  def __init__(
      self,
      *,
      splits: Mapping[str, str | os.PathLike] | None = None,
      kind: str = "qa",
      video_root: str | os.PathLike = ".",
      num_frames: int = 8,
      frame_size: int = 224,
      max_error_rate: float | None = None,
      num_threads: int = 8,
      **kwargs,
  ):
    """Configures a build; `Source` reads a built split without these.

    Args:
      splits: the jsonl file of each split.
      kind: their record format (records.REQUIRED_FIELDS).
      video_root: the folder that records' "video" paths are relative to.
      num_frames: frames sampled per video.
      frame_size: the stored frames' side (shortest side resize, center crop).
      max_error_rate: above this share of bad records a split fails.
      num_threads: videos decoded in parallel.
      **kwargs: for tfds.core.GeneratorBasedBuilder (data_dir, ...).
    """
    self._splits = dict(splits or {})
    self._kind = kind
    self._video_root = Path(video_root)
    self._num_frames = num_frames
    self._frame_size = frame_size
    self._max_error_rate = max_error_rate
    self._num_threads = num_threads
    self.reports: dict[str, records.ReadReport] = {}
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    frames_shape = (self._num_frames, self._frame_size, self._frame_size, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "record": tfds.features.Text(),
            "frames": tfds.features.Tensor(
                shape=frames_shape, dtype=np.uint8, encoding="zlib"),
        }),
        disable_shuffling=True,  # Index i is the i-th good record.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Inputs are local files.
    if not self._splits:
      raise ValueError("VideoRecords needs splits={name: jsonl path} to build")
    return {name: self._generate_examples(name, Path(path))
            for name, path in self._splits.items()}

  def _generate_examples(self, split: str, path: Path) -> Iterator:
    report = self.reports[split] = records.ReadReport()
    good = list(records.iter_jsonl(path, self._kind, report, self._video_root))
    chunk_size = 4 * self._num_threads
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      for start in range(0, len(good), chunk_size):
        chunk = good[start:start + chunk_size]
        decoded = pool.map(self._frames, (record for _, record in chunk))
        for (line, record), frames in zip(chunk, decoded):
          if isinstance(frames, video.VideoError):
            report.skip(path, line, records.BadRecord("bad_video", str(frames)))
            continue
          report.keep(record)
          yield record["id"], {"id": record["id"], "frames": frames,
                               "record": json.dumps(record, ensure_ascii=False)}
    logging.info("%s: %s", path, report.summary())
    report.check(self._max_error_rate)

  def _frames(self, record) -> np.ndarray | video.VideoError:
    try:
      frames = video.read_video(self._video_root / record["video"],
                                self._num_frames)
    except video.VideoError as e:
      return e
    return video.resize_and_crop(frames, self._frame_size)


class Source(Sequence):
  """Random access to a built split: (record, frames uint8 [T, S, S, 3])."""

  def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
    self._name = f"{data_dir}:{split}"
    # Features come from the prepared files, whatever sizes they were built at.
    builder = tfds.builder_from_directory(
        Path(data_dir) / VideoRecords.name / str(VideoRecords.VERSION))
    self._examples = builder.as_data_source(split)
    self.frame_shape = builder.info.features["frames"].shape

  def __len__(self) -> int:
    return len(self._examples)

  def locate(self, index: int) -> tuple[str, int]:
    """The split and the example's index in it (errors name the record)."""
    return self._name, index

  def __getitem__(self, index: int) -> tuple[records.Record, np.ndarray]:
    example = self._examples[index]
    return json.loads(example["record"]), example["frames"]
