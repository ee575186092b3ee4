"""Video name -> the frames the model sees: decoded every time, or prepared once.

`Frames` is the one place where a record's "video" becomes pixels, for the
policy's stages and evaluation (policy.Policy.video) and for the grain
loaders (loader.JsonlSource). It decodes `root / name` at each call, or,
given `prepared` (the folder that `prepare` wrote, config.data.video_cache),
reads the frames that were decoded there once (tfds_builder.Prepared). Both
give the same bytes: T frames sampled uniformly, resized and center-cropped
to S x S, uint8 [T, S, S, 3]; video.normalize finishes the preprocessing.

`prepare` decodes each distinct video of some jsonl files (a prompts file,
test sets) once, into an array_record dataset, so that no iteration of the
loop decodes a video again (benchmarks/video_io.py measures the saving).
"""
from collections.abc import Sequence
import os
from pathlib import Path

import numpy as np

from isr_dpo_jax import errors
from isr_dpo_jax.data import records
from isr_dpo_jax.data import tfds_builder
from isr_dpo_jax.data import video


class Frames:
  """A run's videos by name: uint8 [T, S, S, 3] frames (module docstring)."""

  def __init__(self, root: str | os.PathLike, num_frames: int,
               frame_size: int, prepared: str | os.PathLike | None = None):
    """Decodes videos under `root`, or reads them from `prepared`.

    Raises:
      tfds_builder.PreparedMismatch: `prepared` holds no prepared videos, or
        holds them with another number of frames or size.
    """
    self.root = Path(root)
    self.frame_shape = (num_frames, frame_size, frame_size, 3)
    self.prepared = (tfds_builder.Prepared(prepared, self.frame_shape)
                     if prepared else None)

  def __call__(self, name: str) -> np.ndarray:
    """The frames of video `name`; raises video.VideoError if there are none."""
    if self.prepared is not None:
      return self.prepared[name]
    num_frames, size = self.frame_shape[:2]
    return video.resize_and_crop(video.read_video(self.root / name, num_frames),
                                 size)


def prepare(data_dir: str | os.PathLike, files: Sequence[str | os.PathLike],
            video_root: str | os.PathLike, num_frames: int, frame_size: int, *,
            max_error_rate: float | None = None,
            num_threads: int = 8) -> tfds_builder.Prepared:
  """Writes the frames of every distinct video that `files` name to `data_dir`.

  `files` are jsonl files of records with a "video" field (prompts in the qa
  format, test sets); their bad lines are logged and left out. A video that
  does not decode (or is missing) is logged with the file:line of the first
  record naming it, and its lookups fail with the same cause. A dataset
  already in `data_dir` is kept if it holds every one of these videos at
  this size, so a second call costs nothing.

  Raises:
    errors.UserError: `files` name no video.
    records.TooManyBadRecords: more than `max_error_rate` of the videos (or
      all of them) do not decode.
    tfds_builder.PreparedMismatch: `data_dir` holds videos prepared at
      another size or from other files.
  """
  first_named = {}  # video -> (file, line) of the first record naming it
  for path in files:
    for line, record in records.iter_jsonl(path, "qa", records.ReadReport()):
      first_named.setdefault(record["video"], (str(path), line))
  if not first_named:
    raise errors.UserError(f"{', '.join(map(str, files))}: no record names "
                           "a video")
  tfds_builder.VideoFrames(
      data_dir=data_dir, videos=first_named, video_root=video_root,
      num_frames=num_frames, frame_size=frame_size,
      max_error_rate=max_error_rate, num_threads=num_threads,
  ).download_and_prepare()
  prepared = tfds_builder.Prepared(data_dir,
                                   (num_frames, frame_size, frame_size, 3))
  if missing := sorted(set(first_named) - prepared.names):
    raise tfds_builder.PreparedMismatch(
        f"{data_dir}: prepared from other files, without {len(missing)} of "
        f"these videos (first {missing[0]}); prepare them into another folder")
  return prepared
