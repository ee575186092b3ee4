"""Video input as Video-LLaVA / LLaVA-Hound see it: T frames, CLIP-preprocessed.

`read_video` decodes a video file (decord, or PyAV where decord is missing or
fails) or a folder of extracted frames, sampling T frames uniformly over the
whole clip. `preprocess` resizes, crops and normalises them for the CLIP video
tower. Both run on the host; `normalize` also runs on device, so that loaders
can ship uint8 frames and normalise after the transfer.
"""

import bisect
from collections.abc import Sequence
import logging
import os
import pathlib
import re

import av
import numpy as np
from PIL import Image

try:
  import decord
except ImportError:  # No wheels for ARM: PyAV decodes everything there.
  decord = None

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BACKENDS = ("auto", "decord", "pyav")


class VideoError(Exception):
  """A video that cannot be read: `path` names it and `cause` says why."""

  def __init__(self, path: str | os.PathLike, cause: str):
    super().__init__(str(path), cause)  # Both in args: survives pickling.
    self.path, self.cause = str(path), cause

  def __str__(self) -> str:
    return f"{self.path}: {self.cause}"


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
  """`num_frames` frame indices evenly spread from 0 to `total_frames - 1`.

  Truncated like LLaVA-Hound's `np.linspace(..., dtype=int)`, so that the
  frames match the ones its models were trained on. Clips shorter than
  `num_frames` repeat frames.
  """
  if total_frames < 1 or num_frames < 1:
    raise ValueError(f"need frames to sample: {total_frames=}, {num_frames=}")
  return np.linspace(0, total_frames - 1, num_frames).astype(np.int64)


def read_video(path: str | os.PathLike, num_frames: int = 8,
               backend: str = "auto",
               first_seconds: float | None = None) -> np.ndarray:
  """Reads `num_frames` frames, uniformly sampled, as uint8 [T, H, W, 3] RGB.

  Args:
    path: a video file (mp4, webm, avi, mkv, gif, ...) or a folder of frames
      (jpg/jpeg/png, taken in natural order: frame_9 before frame_10).
    num_frames: T.
    backend: for files: "decord", "pyav", or "auto" (decord, then PyAV if
      decord is missing or fails on the file). Folders ignore it.
    first_seconds: sample only the first this many seconds of a file, as the
      original decord loader does with 10; None samples the whole clip. Frame
      folders carry no frame rate and are always sampled whole, as there.

  Raises:
    VideoError: the path is missing, unreadable, corrupt, truncated, or has no
      decodable frames.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  path = pathlib.Path(path)
  if path.is_dir():
    return _read_frame_folder(path, num_frames)
  if not path.exists():
    raise VideoError(path, "no such file or folder")
  if backend == "pyav" or (backend == "auto" and decord is None):
    return _read_pyav(path, num_frames, first_seconds)
  if backend == "decord":
    if decord is None:
      raise ImportError("decord is not installed: use backend 'pyav' or 'auto'")
    return _read_decord(path, num_frames, first_seconds)
  try:
    return _read_decord(path, num_frames, first_seconds)
  except VideoError as decord_error:
    logging.info("%s; trying PyAV", decord_error)
    try:
      return _read_pyav(path, num_frames, first_seconds)
    except VideoError as pyav_error:
      raise VideoError(
          path, f"{pyav_error.cause}; {decord_error.cause}") from pyav_error


def _clip_length(total_frames: int, fps: float, first_seconds: float | None):
  if first_seconds is None or not fps:
    return total_frames
  return max(1, min(int(fps * first_seconds), total_frames))


def _first_line(error: Exception) -> str:
  """The message without decord's "[time] source.cc:line: " prefixes."""
  lines = str(error).strip().splitlines() or [repr(error)]
  return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", lines[0])


def _read_decord(path, num_frames, first_seconds):
  try:
    reader = decord.VideoReader(str(path))
    if len(reader) == 0:
      raise VideoError(path, "decord: no decodable frames")
    total = _clip_length(len(reader), reader.get_avg_fps(), first_seconds)
    return reader.get_batch(sample_indices(total, num_frames)).asnumpy()
  except (decord.DECORDError, RuntimeError) as e:  # decord raises both.
    raise VideoError(path, f"decord: {_first_line(e)}") from e


def _read_pyav(path, num_frames, first_seconds):
  """Decodes only up to each sampled frame, seeking to keyframes ahead."""
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoError(path, "pyav: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      timestamps, keyframes = _index_packets(container, stream)
      if not timestamps:
        raise VideoError(path, "pyav: no decodable frames")
      if None in timestamps:
        raise VideoError(path, "pyav: frames without timestamps")
      if stream.frames > len(timestamps):
        raise VideoError(path, f"pyav: truncated, {len(timestamps)} of "
                         f"{stream.frames} frames present")
      timestamps.sort()
      fps = stream.average_rate or stream.guessed_rate
      total = _clip_length(len(timestamps), fps, first_seconds)
      wanted = [timestamps[i] for i in sample_indices(total, num_frames)]
      frames = _decode_at(container, stream, sorted(set(wanted)),
                          sorted(keyframes) or timestamps[:1])
  except av.FFmpegError as e:
    raise VideoError(path, f"pyav: {_first_line(e)}") from e
  for index, timestamp in enumerate(wanted):
    if timestamp not in frames:
      raise VideoError(path, f"pyav: cannot decode frame {index} "
                       f"(pts {timestamp})")
  return np.stack([frames[timestamp] for timestamp in wanted])


def _index_packets(container, stream):
  """Presentation timestamps of all frames and of the keyframes, undecoded."""
  timestamps, keyframes = [], []
  for packet in container.demux(stream):
    if packet.size == 0:  # The demuxer's end-of-stream marker.
      continue
    timestamp = packet.pts if packet.pts is not None else packet.dts
    timestamps.append(timestamp)
    if packet.is_keyframe:
      keyframes.append(timestamp)
  return timestamps, keyframes


def _decode_at(container, stream, targets: Sequence[int],
               keyframes: Sequence[int]) -> dict[int, np.ndarray]:
  """RGB frames at the sorted timestamps `targets`, keyed by timestamp."""
  frames, position, decoded = {}, None, iter(())
  for target in targets:
    keyframe = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
    if position is None or position < keyframe:
      container.seek(keyframe, stream=stream, backward=True)
      decoded = container.decode(stream)
    for frame in decoded:
      if frame.pts is None:
        continue
      position = frame.pts
      if position == target:
        frames[target] = frame.to_ndarray(format="rgb24")
      if position >= target:
        break
  return frames


def _natural_key(name: str) -> list[str | int]:
  return [int(part) if part.isdigit() else part.lower()
          for part in re.split(r"(\d+)", name)]


def _read_frame_folder(path, num_frames):
  files = sorted((f for f in path.iterdir()
                  if f.suffix.lower() in IMAGE_SUFFIXES),
                 key=lambda f: _natural_key(f.name))
  if not files:
    raise VideoError(path, "folder has no image frames "
                     f"({', '.join(IMAGE_SUFFIXES)})")
  indices = sample_indices(len(files), num_frames)
  images = {i: _read_image(path, files[i]) for i in set(indices.tolist())}
  shapes = {image.shape for image in images.values()}
  if len(shapes) > 1:
    raise VideoError(path, f"frames differ in size: {sorted(shapes)}")
  return np.stack([images[i] for i in indices])


def _read_image(folder, file):
  try:
    with Image.open(file) as image:
      return np.asarray(image.convert("RGB"))
  except OSError as e:  # PIL's errors for unknown and broken images.
    raise VideoError(folder, f"cannot read frame {file.name}: {e}") from e


def resize_and_crop(frames: np.ndarray, size: int = 224) -> np.ndarray:
  """uint8 [..., H, W, 3] -> [..., size, size, 3]: short side to size, crop.

  Bicubic as PIL does it, with the output size and crop offsets computed as in
  transformers' CLIPImageProcessor.
  """
  *batch, height, width, _ = frames.shape
  if height <= width:
    new_height, new_width = size, int(size * width / height)
  else:
    new_height, new_width = int(size * height / width), size
  top, left = (new_height - size) // 2, (new_width - size) // 2
  flat = frames.reshape(-1, height, width, 3)
  out = np.empty((len(flat), size, size, 3), np.uint8)
  for i, frame in enumerate(flat):
    resized = Image.fromarray(frame).resize(
        (new_width, new_height), Image.Resampling.BICUBIC)
    out[i] = np.asarray(resized)[top:top + size, left:left + size]
  return out.reshape(*batch, size, size, 3)


def normalize(pixels):
  """uint8 [..., 3] -> float32 CLIP inputs; NumPy or JAX arrays alike."""
  return (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def preprocess(frames: np.ndarray, size: int = 224) -> np.ndarray:
  """uint8 [..., H, W, 3] frames -> float32 [..., size, size, 3] CLIP inputs."""
  return normalize(resize_and_crop(frames, size))
