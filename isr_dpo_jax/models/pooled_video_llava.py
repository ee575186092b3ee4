"""Video-LLaVA with LLaVA-NeXT-Video's pooled video features: 4x fewer video tokens.

LLaVA-NeXT-Video drops each frame's class token and average-pools its patch
grid with stride 2 (`spatial_pool_stride`, mode "average") between the tower
and the projector, so a 24 x 24 grid of patches enters the language model as
12 x 12 embeddings. Tower, projector and decoder are Video-LLaVA's
(video_llava.py); only `tower_features`, and so the number of video tokens,
differ. The second family behind models/interface.py
(tests/test_model_families.py runs the loop on it). Its checkpoints are
Video-LLaVA's "original" layout with LLaVA-NeXT-Video's pooling keys in
config.json.
"""
import dataclasses
import os
from typing import Literal

import jax

from isr_dpo_jax.models import config as config_lib
from isr_dpo_jax.models.video_llava import VideoLlava


@dataclasses.dataclass(frozen=True)
class PooledVideoLlavaConfig(config_lib.VideoLlavaConfig):
  """A Video-LLaVA config whose patch features are pooled `pool_stride` x
  `pool_stride` (the class tokens are dropped, so the strategy is "patch")."""
  feature_strategy: Literal["patch"] = "patch"
  pool_stride: int = 2

  def __post_init__(self):
    super().__post_init__()
    side = self.vision.image_size // self.vision.patch_size
    if self.feature_strategy != "patch" or side % self.pool_stride:
      raise ValueError(f"pooling needs patch features in a grid that the stride divides, "
                       f"got {self.feature_strategy!r} features, a {side}x{side} grid "
                       f"and stride {self.pool_stride}")

  @property
  def tokens_per_frame(self) -> int:
    side = self.vision.image_size // self.vision.patch_size
    return (side // self.pool_stride) ** 2


def from_json(d: dict, checkpoint_dir: str | os.PathLike
              ) -> tuple[PooledVideoLlavaConfig, str]:
  """Video-LLaVA's config.json reading, plus LLaVA-NeXT-Video's pooling keys."""
  if d.get("spatial_pool_mode", "average") != "average":
    raise ValueError(f"only average pooling is supported, got {d['spatial_pool_mode']!r}")
  cfg, layout = config_lib.from_json(d, checkpoint_dir)
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  return PooledVideoLlavaConfig(**fields, pool_stride=d.get("spatial_pool_stride", 2)), layout


def to_json(c: PooledVideoLlavaConfig, layout: str) -> dict:
  return config_lib.to_json(c, layout) | {"spatial_pool_mode": "average",
                                          "spatial_pool_stride": c.pool_stride}


def pool_frames(patches_BxTxPxD: jax.Array, stride: int) -> jax.Array:
  """Each frame's square patch grid average-pooled, [B, T * P / stride^2, D],
  frame-major then row-major (torch's AvgPool2d order)."""
  b, t, p, d = patches_BxTxPxD.shape
  side = round(p ** 0.5)
  grid = patches_BxTxPxD.reshape(b, t, side // stride, stride, side // stride, stride, d)
  return grid.mean(axis=(3, 5)).reshape(b, -1, d)


class PooledVideoLlava(VideoLlava):
  """Video-LLaVA whose tower features are pooled before the projector."""

  def tower_features(self, videos_BxTxHxWx3: jax.Array) -> jax.Array:
    """Pooled patch features [B, num_video_tokens, vision hidden]."""
    hidden_BxTxLxD = self.video_tower(videos_BxTxHxWx3)
    return pool_frames(hidden_BxTxLxD[:, :, 1:], self.config.pool_stride)
