"""Video-LLaVA: video tower -> feature selection -> projector -> merged into the LLM.

The reference implementation of models/interface.py's VideoLanguageModel: the
three stages are separate methods so that callers can reuse their pieces: the
frozen tower's output `encode_video(videos)` can be computed once per video
and merged into many prompts with `embed`, and `decode` runs the language model
on embeddings with explicit positions, masks and a KV cache (see llama.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isr_dpo_jax.models import interface
from isr_dpo_jax.models import layers
from isr_dpo_jax.models.config import VideoLlavaConfig
from isr_dpo_jax.models.llama import KVCache, Llama
from isr_dpo_jax.models.vision import VisionTower


class Projector(nnx.Module):
  """mlp2x_gelu (Linear, GELU, Linear) or a single Linear layer."""

  def __init__(self, cfg: VideoLlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dv, dt = cfg.vision.hidden_size, cfg.text.hidden_size
    self.linear_1 = layers.dense(dv, dt, ("embed", "mlp"), **kw)
    self.linear_2 = (layers.dense(dt, dt, ("mlp", "embed"), **kw)
                     if cfg.projector == "mlp2x_gelu" else None)
    self.act = layers.activation("gelu")

  def __call__(self, x):
    x = self.linear_1(x)
    return x if self.linear_2 is None else self.linear_2(self.act(x))


def _check_placeholders(is_video_BxL, num_embeddings: int):
  """Raises if a row does not hold one placeholder per visual embedding.

  Only concrete ids can be checked; under jit the caller owns this invariant.
  """
  if isinstance(is_video_BxL, jax.core.Tracer):
    return
  counts = np.asarray(is_video_BxL).sum(axis=1)
  bad = np.flatnonzero(counts != num_embeddings)
  if bad.size:
    raise ValueError(
        f"video placeholders do not match the video embeddings: row(s) {bad.tolist()} "
        f"hold {counts[bad].tolist()} placeholder ids, each video gives {num_embeddings}")


class VideoLlava(nnx.Module):
  """The Video-LLaVA model; `__call__` maps (ids, videos, padding mask) to logits."""

  parameter_groups = {interface.VIDEO_TOWER: r"^video_tower/",
                      interface.PROJECTOR: r"^multi_modal_projector/"}

  def __init__(self, cfg: VideoLlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.video_tower = VisionTower(cfg.vision, cfg.num_tower_layers, **kw)
    self.multi_modal_projector = Projector(cfg, **kw)
    self.language_model = Llama(cfg.text, **kw)

  @property
  def video(self) -> interface.VideoInput:
    cfg = self.config
    return interface.VideoInput(num_frames=cfg.vision.num_frames,
                                frame_size=cfg.vision.image_size,
                                token_id=cfg.video_token_id,
                                num_tokens=cfg.num_video_tokens)

  def encode_video(self, videos_BxTxHxWx3: jax.Array) -> jax.Array:
    """Projected visual embeddings [B, num_video_tokens, text hidden], frame-major."""
    return self.project(self.tower_features(videos_BxTxHxWx3))

  def tower_features(self, videos_BxTxHxWx3: jax.Array) -> jax.Array:
    """The tower's selected features [B, num_video_tokens, vision hidden]."""
    hidden_BxTxLxD = self.video_tower(videos_BxTxHxWx3)
    if self.config.feature_strategy == "patch":
      hidden_BxTxLxD = hidden_BxTxLxD[:, :, 1:]
    b = hidden_BxTxLxD.shape[0]
    return hidden_BxTxLxD.reshape(b, -1, hidden_BxTxLxD.shape[-1])

  def project(self, features_BxNxDv: jax.Array) -> jax.Array:
    """Tower features -> the language model's embedding space."""
    return self.multi_modal_projector(features_BxNxDv)

  def embed(self, input_ids_BxL: jax.Array, feats_BxNxD: jax.Array | None = None) -> jax.Array:
    """Token embeddings with the k-th video placeholder of row b set to feats[b, k]."""
    if feats_BxNxD is None:
      return self.language_model.embed(input_ids_BxL)
    is_video = input_ids_BxL == self.config.video_token_id
    x_BxLxD = self.language_model.embed(jnp.where(is_video, 0, input_ids_BxL))
    _check_placeholders(is_video, feats_BxNxD.shape[1])
    slot_BxL = jnp.clip(jnp.cumsum(is_video, axis=1) - 1, 0, feats_BxNxD.shape[1] - 1)
    video_BxLxD = jnp.take_along_axis(feats_BxNxD, slot_BxL[..., None], axis=1)
    return jnp.where(is_video[..., None], video_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)

  def decode(self, x_BxLxD, positions_BxL, mask=None, cache: KVCache | None = None):
    """The language model on embeddings: (logits [B, L, V], cache); see llama.py."""
    return self.language_model(x_BxLxD, positions_BxL, mask, cache)

  def hidden_states(self, x_BxLxD, positions_BxL, mask=None, cache: KVCache | None = None,
                    *, remat_policy=None, last_only=False):
    """`decode` without the output head: (hidden states [B, L, D], cache)."""
    return self.language_model.hidden_states(x_BxLxD, positions_BxL, mask, cache,
                                             remat_policy=remat_policy, last_only=last_only)

  def prefill(self, x_BxLxD, positions_BxL, mask_BxL, max_len: int, dtype=None,
              num_samples: int = 1):
    """The hidden state after each prompt and a new cache of max_len slots
    for num_samples rows each; see llama.py."""
    return self.language_model.prefill(x_BxLxD, positions_BxL, mask_BxL, max_len, dtype,
                                       num_samples)

  def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
    """The output head on final hidden states (see `hidden_states`)."""
    return self.language_model.logits(hidden_BxLxD)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    return self.language_model.init_cache(batch_size, max_len, dtype)

  def __call__(self, input_ids_BxL, videos=None, attention_mask=None) -> jax.Array:
    """Logits [B, L, V]. attention_mask [B, L] marks real tokens (left or right
    padding); positions count real tokens, so left padding does not shift them."""
    feats = None if videos is None else self.encode_video(videos)
    x_BxLxD = self.embed(input_ids_BxL, feats)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids_BxL.shape, jnp.int32)
    positions_BxL = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, _ = self.decode(x_BxLxD, positions_BxL, attention_mask)
    return logits
