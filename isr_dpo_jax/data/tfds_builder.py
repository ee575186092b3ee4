"""A TFDS dataset of videos decoded once: their model-ready frames, in array_record.

Every iteration of the loop shows each video to the model several times (two
answers, the context, the judge, reference log-probs, training epochs).
Decoding is the slow part of that (benchmarks/video_io.py), and it gives
the same frames each time. `VideoFrames` decodes each distinct video once:
an example holds a video's name (the "video" field of the records naming it)
and its T frames, sampled, resized and center-cropped as video.py does it
(uint8 [T, S, S, 3], zlib-compressed). `Prepared` reads them back by name
through the random-access data source that TFDS gives for array_record (the
one grain reads), with no decoding. TensorFlow is not needed.

Videos that cannot be decoded are skipped, logged with the file:line of the
first record that names them, and kept with their cause in the dataset's
metadata, so that a lookup fails with the same cause; past `max_error_rate`
the build stops.

  builder = VideoFrames(data_dir=..., videos={"a.mp4": ("qa.jsonl", 1)},
                        video_root=..., num_frames=8, frame_size=224)
  builder.download_and_prepare()
  frames_TxSxSx3 = Prepared(data_dir, (8, 224, 224, 3))["a.mp4"]
"""
from collections.abc import Iterator, Mapping
import concurrent.futures
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from isr_dpo_jax import errors
from isr_dpo_jax.data import records
from isr_dpo_jax.data import video

SPLIT = "videos"


class PreparedMismatch(errors.UserError):
  """Prepared videos that do not fit the run (missing, or other frame sizes)."""


class VideoFrames(tfds.core.GeneratorBasedBuilder):
  """Distinct videos and their frames (see the module docstring)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Records as JSON text, frames uint8 [T, S, S, 3].",
      "2.0.0": "One example per distinct video: its name and frames.",
  }
  # Inputs are local files, so there is no checksums file to look up next to
  # this module. Looking would import `importlib_resources`, which TFDS 4.9
  # uses but no longer installs on Python >= 3.9.
  code_path = None

  def __init__(
      self,
      *,
      videos: Mapping[str, tuple[str, int]] | None = None,
      video_root: str | os.PathLike = ".",
      num_frames: int = 8,
      frame_size: int = 224,
      max_error_rate: float | None = None,
      num_threads: int = 8,
      **kwargs,
  ):
    """Configures a build; `Prepared` reads a built dataset without these.

    Args:
      videos: each video's name (its path under `video_root`) -> the file
        and line of a record naming it, for error messages.
      video_root: the folder the names are relative to.
      num_frames: frames sampled per video.
      frame_size: the stored frames' side (shortest side resize, center crop).
      max_error_rate: above this share of undecodable videos the build fails.
      num_threads: videos decoded in parallel.
      **kwargs: for tfds.core.GeneratorBasedBuilder (data_dir, ...).
    """
    self._videos = dict(videos or {})
    self._video_root = Path(video_root)
    self._num_frames = num_frames
    self._frame_size = frame_size
    self._max_error_rate = max_error_rate
    self._num_threads = num_threads
    self.report = records.ReadReport()
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    frames_shape = (self._num_frames, self._frame_size, self._frame_size, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Text(),
            "frames": tfds.features.Tensor(
                shape=frames_shape, dtype=np.uint8, encoding="zlib"),
        }),
        # Written at the end of the build: {"videos": the names of the
        # examples in order, "bad": {name: why it did not decode}}.
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # Example i is metadata["videos"][i].
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Inputs are local files.
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator:
    names, bad = sorted(self._videos), {}
    chunk_size = 4 * self._num_threads
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      for start in range(0, len(names), chunk_size):
        chunk = names[start:start + chunk_size]
        for name, frames in zip(chunk, pool.map(self._frames, chunk)):
          if isinstance(frames, video.VideoError):
            bad[name] = frames.cause
            self.report.skip(*self._videos[name],
                             records.BadRecord("bad_video", str(frames)))
            continue
          self.report.count_good()
          yield name, {"video": name, "frames": frames}
    logging.info("videos: %s", self.report.summary())
    # TFDS cannot write a dataset of no examples.
    self.report.check(self._max_error_rate if self.report.num_good else 0.0)
    self.info.metadata.update(
        videos=[name for name in names if name not in bad], bad=bad)

  def _frames(self, name: str) -> np.ndarray | video.VideoError:
    try:
      frames = video.read_video(self._video_root / name, self._num_frames)
    except video.VideoError as e:
      return e
    return video.resize_and_crop(frames, self._frame_size)


class Prepared:
  """A built VideoFrames dataset, by video name: uint8 [T, S, S, 3] frames."""

  def __init__(self, data_dir: str | os.PathLike,
               frame_shape: tuple[int, int, int, int]):
    """Opens the dataset in `data_dir` (the builder's data_dir).

    Raises:
      PreparedMismatch: there is none, or its frames are not `frame_shape`.
    """
    self.data_dir = Path(data_dir)
    path = self.data_dir / VideoFrames.name / str(VideoFrames.VERSION)
    if not (path / "dataset_info.json").exists():
      raise PreparedMismatch(
          f"{data_dir}: no prepared videos there (isr-dpo prepare-videos "
          "writes them)")
    builder = tfds.builder_from_directory(path)
    prepared = tuple(builder.info.features["frames"].shape)
    if prepared != tuple(frame_shape):
      raise PreparedMismatch(
          f"{data_dir}: videos prepared as {_frames_text(prepared)}, but the "
          f"model reads {_frames_text(frame_shape)}; prepare them for this "
          "model into another folder (isr-dpo prepare-videos)")
    self._examples = builder.as_data_source(SPLIT)
    self._index = {name: i for i, name in
                   enumerate(builder.info.metadata["videos"])}
    self.bad: dict[str, str] = dict(builder.info.metadata["bad"])

  @property
  def names(self) -> set[str]:
    """Every video the build saw, decodable or not."""
    return set(self._index) | set(self.bad)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, name: str) -> np.ndarray:
    """Raises video.VideoError for a video not prepared (or undecodable)."""
    index = self._index.get(name)
    if index is None:
      raise video.VideoError(name, self.bad.get(name) or (
          f"not among the videos prepared in {self.data_dir}"))
    return self._examples[index]["frames"]


def _frames_text(shape) -> str:
  num_frames, height, width, _ = shape
  return f"{num_frames} frames of {height}x{width}"
