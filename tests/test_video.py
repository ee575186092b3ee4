"""Video reading: frame indices and frames against a plain sequential decode."""

import pickle

import av
import hypothesis
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest

import conftest
from isr_dpo_jax.data import video

FILE_BACKENDS = ("decord", "pyav")

# Synthetic clips: frame t is a flat grey of level 10 + 10 t, so pixels name
# the frame; short GOPs make the PyAV reader seek between keyframes.
NUM_CODED_FRAMES, CODED_FPS = 24, 6
CODECS = {"mp4": ("libx264", "yuv420p"), "webm": ("libvpx-vp9", "yuv420p"),
          "avi": ("mpeg4", "yuv420p"), "mkv": ("libx264", "yuv420p"),
          "gif": ("gif", "rgb8")}


def reference_frames(path, indices):
  """Frames at `indices`, counted in a plain decode from the first frame."""
  wanted, frames = set(indices), {}
  with av.open(str(path)) as container:
    for i, frame in enumerate(container.decode(video=0)):
      if i in wanted:
        frames[i] = frame.to_ndarray(format="rgb24")
    rate, count = container.streams.video[0].average_rate, i + 1
  return np.stack([frames[i] for i in indices]), float(rate), count


def frame_ids(frames):
  return np.round((frames.reshape(len(frames), -1).mean(1) - 10) / 10)


@pytest.fixture(scope="module")
def coded_clips(tmp_path_factory):
  folder = tmp_path_factory.mktemp("coded")
  paths = {}
  for ext, (codec, pix_fmt) in CODECS.items():
    paths[ext] = folder / f"clip.{ext}"
    with av.open(str(paths[ext]), "w") as container:
      stream = container.add_stream(codec, rate=CODED_FPS)
      stream.width = stream.height = 32
      stream.pix_fmt = pix_fmt
      stream.codec_context.gop_size = 5
      for t in range(NUM_CODED_FRAMES):
        frame = np.full((32, 32, 3), 10 + 10 * t, np.uint8)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
      container.mux(stream.encode())
  return paths


@hypothesis.given(st.integers(1, 5000), st.integers(1, 64))
def test_sample_indices_spread_over_the_clip(total, num):
  indices = video.sample_indices(total, num)
  # LLaVA-Hound's sampler, the definition we reproduce.
  np.testing.assert_array_equal(
      indices, np.linspace(0, total - 1, num, dtype=int))
  assert indices[0] == 0 and (num == 1 or indices[-1] == total - 1)
  assert np.all(np.diff(indices) >= 0)
  assert np.all(np.diff(indices) <= -(-(total - 1) // max(num - 1, 1)))


def test_sample_indices_repeat_frames_of_short_clips():
  np.testing.assert_array_equal(video.sample_indices(3, 8),
                                [0, 0, 0, 0, 1, 1, 1, 2])
  with pytest.raises(ValueError):
    video.sample_indices(0, 8)


@conftest.needs_real_clips
@pytest.mark.parametrize("first_seconds", [None, 3])
@pytest.mark.parametrize("clip", conftest.REAL_CLIPS, ids=lambda p: p.name)
def test_backends_read_the_sampled_frames_of_real_clips(clip, first_seconds):
  with av.open(str(clip)) as container:
    stream = container.streams.video[0]
    total, fps = stream.frames, float(stream.average_rate)
  span = total if first_seconds is None else int(fps * first_seconds)
  indices = np.linspace(0, span - 1, 8, dtype=int)
  expected, _, decoded_count = reference_frames(clip, indices)
  assert decoded_count == total
  for backend in FILE_BACKENDS:
    frames = video.read_video(clip, 8, backend=backend,
                              first_seconds=first_seconds)
    assert frames.dtype == np.uint8 and frames.shape == expected.shape
    diff = np.abs(frames.astype(int) - expected)
    # Neighbouring frames of these clips differ by 0.1 to 1.9 on average.
    assert diff.mean(axis=(1, 2, 3)).max() < 0.05, backend


@pytest.mark.parametrize("first_seconds", [None, 2])
@pytest.mark.parametrize("ext", CODECS)
def test_containers_and_seeks(coded_clips, ext, first_seconds):
  span = NUM_CODED_FRAMES if first_seconds is None else CODED_FPS * 2
  expected = video.sample_indices(span, 8)
  for backend in ("auto",) + FILE_BACKENDS:
    if backend == "decord" and ext == "gif":
      continue  # decord cannot read GIFs; "auto" falls back to PyAV.
    frames = video.read_video(coded_clips[ext], 8, backend=backend,
                              first_seconds=first_seconds)
    np.testing.assert_array_equal(frame_ids(frames), expected, err_msg=backend)


def test_decord_rejects_gif_and_auto_falls_back(coded_clips):
  with pytest.raises(video.VideoError, match="decord"):
    video.read_video(coded_clips["gif"], backend="decord")
  np.testing.assert_array_equal(
      video.read_video(coded_clips["gif"], backend="auto"),
      video.read_video(coded_clips["gif"], backend="pyav"))


def test_auto_uses_pyav_without_decord(coded_clips, monkeypatch):
  expected = video.read_video(coded_clips["mp4"], backend="pyav")
  monkeypatch.setattr(video, "decord", None)
  np.testing.assert_array_equal(video.read_video(coded_clips["mp4"]), expected)
  with pytest.raises(ImportError, match="decord"):
    video.read_video(coded_clips["mp4"], backend="decord")


def write_folder(folder, names, size=(12, 16)):
  folder.mkdir()
  for t, name in enumerate(names):
    Image.fromarray(np.full(size + (3,), 10 * t, np.uint8)).save(folder / name)
  return folder


@pytest.mark.parametrize("ext", ["png", "jpg", "JPEG"])
def test_frame_folder_in_natural_order(tmp_path, ext):
  names = [f"frame_{t + 1}.{ext}" for t in range(12)]
  folder = write_folder(tmp_path / "clip", names)
  (folder / "notes.txt").write_text("not a frame")
  frames = video.read_video(folder, 8)
  assert frames.shape == (8, 12, 16, 3)
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)) / 10,
                             video.sample_indices(12, 8), atol=0.1)


def test_short_frame_folder_repeats_frames(tmp_path):
  folder = write_folder(tmp_path / "clip", ["a_1.png", "a_2.png", "a_3.png"])
  np.testing.assert_array_equal(video.read_video(folder, 8)[:, 0, 0, 0] // 10,
                                [0, 0, 0, 0, 1, 1, 1, 2])


def real_clip_bytes():
  return conftest.REAL_CLIPS[0].read_bytes() if conftest.REAL_CLIPS else b""


def write_bad(tmp_path, name):
  """Bad inputs; returns (path, a phrase the cause must contain)."""
  path = tmp_path / name
  data = real_clip_bytes()
  if name == "missing.mp4":
    return path, "no such file"
  if name == "corrupt.mp4":
    path.write_bytes(b"\x00\x01 not a video " * 64)
    return path, "invalid data"
  if name == "empty.mp4":
    path.write_bytes(b"")
    return path, "invalid data"
  if name == "truncated.mp4":
    path.write_bytes(data[:len(data) // 2])
    return path, "truncated"
  if name == "header_only.mp4":  # The moov atom leads: frames but no data.
    path.write_bytes(data[:data.find(b"mdat") + 4])
    return path, "no decodable frames"
  if name == "empty_folder":
    path.mkdir()
    return path, "no image frames"
  if name == "broken_frame":
    write_folder(path, ["1.png", "2.png"])
    (path / "3.png").write_bytes(b"\x89PNG broken")
    return path, "cannot read frame 3.png"
  if name == "mixed_sizes":
    write_folder(path, ["1.png"])
    Image.new("RGB", (5, 5)).save(path / "2.png")
    return path, "differ in size"
  raise ValueError(name)


BAD_INPUTS = ["missing.mp4", "corrupt.mp4", "empty.mp4", "truncated.mp4",
              "header_only.mp4", "empty_folder", "broken_frame", "mixed_sizes"]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_video_error(tmp_path, name, backend):
  if name in ("truncated.mp4", "header_only.mp4") and not conftest.REAL_CLIPS:
    pytest.skip("needs a real clip to damage")
  path, cause = write_bad(tmp_path, name)
  with pytest.raises(video.VideoError) as error:
    video.read_video(path, backend=backend)
  assert error.value.path == str(path)
  assert cause in error.value.cause.lower()
  assert str(error.value).startswith(f"{path}: ")
  # Loader workers send errors across processes.
  assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend"):
    video.read_video("clip.mp4", backend="opencv")
