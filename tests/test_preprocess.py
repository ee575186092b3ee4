"""CLIP preprocessing against transformers' CLIPImageProcessor."""
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
import transformers

import conftest
from isr_dpo_jax.data import video

TOLERANCE = 2 / 255  # Acceptance: per pixel, before normalisation.


def clip_processor(size, normalize):
  return transformers.CLIPImageProcessor(
      size={"shortest_edge": size}, crop_size={"height": size, "width": size},
      do_normalize=normalize)


def reference(frames, size, normalize):
  """[T, size, size, 3] from CLIPImageProcessor (bicubic)."""
  out = clip_processor(size, normalize)(list(frames), return_tensors="np")
  return np.asarray(out["pixel_values"]).transpose(0, 2, 3, 1)


def smooth_frames(shape, seed=0):
  """Random frames with structure at several scales, so resampling shows."""
  rng = np.random.default_rng(seed)
  t, h, w = shape
  coarse = rng.uniform(0, 255, (t, h // 4 + 1, w // 4 + 1, 3))
  fine = np.repeat(np.repeat(coarse, 4, 1), 4, 2)[:, :h, :w]
  return np.clip(fine + rng.normal(0, 20, fine.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=conftest.REAL_CLIPS, ids=lambda p: p.name)
def real_frames(request):
  return video.read_video(request.param, 8)


@conftest.needs_real_clips
def test_matches_clip_processor_on_real_clips(real_frames):
  pixels = video.resize_and_crop(real_frames, 224)
  assert pixels.shape == (8, 224, 224, 3) and pixels.dtype == np.uint8
  expected = reference(real_frames, 224, normalize=False)
  assert np.abs(pixels / 255.0 - expected).max() <= TOLERANCE
  normalized = video.preprocess(real_frames, 224)
  assert normalized.dtype == np.float32
  np.testing.assert_allclose(normalized, reference(real_frames, 224, True),
                             atol=TOLERANCE / video.CLIP_STD.min())


@pytest.mark.parametrize("height, width, size", [
    (48, 30, 24),   # portrait, odd crop offset
    (37, 61, 32),   # landscape, non-integer scale
    (20, 28, 32),   # upscaling
    (32, 32, 32),   # already the target size
])
def test_matches_clip_processor_on_any_aspect(height, width, size):
  frames = smooth_frames((2, height, width))
  pixels = video.resize_and_crop(frames, size)
  assert pixels.shape == (2, size, size, 3)
  expected = reference(frames, size, normalize=False)
  assert np.abs(pixels / 255.0 - expected).max() <= TOLERANCE


def test_batches_of_videos():
  frames = smooth_frames((6, 40, 50)).reshape(2, 3, 40, 50, 3)
  batched = video.preprocess(frames, 16)
  assert batched.shape == (2, 3, 16, 16, 3)
  np.testing.assert_array_equal(batched[1], video.preprocess(frames[1], 16))


def test_normalize_on_host_and_device():
  pixels = smooth_frames((2, 8, 8))
  expected = (pixels / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])
              ) / np.array([0.26862954, 0.26130258, 0.27577711])
  host = video.normalize(pixels)
  device = video.normalize(jnp.asarray(pixels))
  assert host.dtype == device.dtype == np.float32
  tolerance.assert_close(host, expected)
  tolerance.assert_close(device, host)
