"""CLIP ViT applied per frame, with optional LanguageBind temporal attention.

Frames are channels-last [B, T, H, W, 3], already CLIP-normalised. The tower is
pre-LN with a class token and learned positions. With temporal attention
(LanguageBind video), every layer first adds a learned per-frame embedding and
runs a residual LayerNorm -> self-attention over the T frames at each token
position, then the usual spatial attention and MLP blocks.

Only the layers that feed the selected feature layer are built and run; the
tower returns the hidden states after its last built layer, [B, T, 1 + P, D].
"""
import jax
import jax.numpy as jnp
from flax import nnx

from isr_dpo_jax.models import layers
from isr_dpo_jax.models.config import VisionConfig


class VisionAttention(nnx.Module):
  """Unmasked multi-head self-attention over the middle axis of [N, L, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.head_dim = cfg.hidden_size // cfg.num_heads
    d = cfg.hidden_size
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.dense(d, d, ("embed", "heads"), **kw)
    self.k_proj = layers.dense(d, d, ("embed", "heads"), **kw)
    self.v_proj = layers.dense(d, d, ("embed", "heads"), **kw)
    self.out_proj = layers.dense(d, d, ("heads", "embed"), **kw)

  def __call__(self, x_NxLxD):
    q, k, v = (layers.split_heads(proj(x_NxLxD), self.head_dim)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    return self.out_proj(layers.merge_heads(layers.attention(q, k, v)))


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nnx.Module):
  """[Temporal block] -> pre-LN spatial attention -> pre-LN MLP, on [B, T, L, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.temporal = cfg.temporal_attention
    if self.temporal:
      init = jax.random.normal(rngs.params(), (1, cfg.num_frames, cfg.hidden_size), param_dtype)
      self.temporal_embedding = nnx.Param(init * cfg.hidden_size**-0.5,
                                          **layers.logical(None, None, "embed"))
      self.temporal_layer_norm1 = norm()
      self.temporal_attn = VisionAttention(cfg, **kw)
    self.layer_norm1 = norm()
    self.self_attn = VisionAttention(cfg, **kw)
    self.layer_norm2 = norm()
    self.mlp = VisionMLP(cfg, **kw)

  def _temporal_block(self, x_BxTxLxD):
    b, t, l, d = x_BxTxLxD.shape
    x_BxLxTxD = x_BxTxLxD.transpose(0, 2, 1, 3)
    if t > 1:  # LanguageBind adds the frame embedding only to multi-frame input.
      x_BxLxTxD = x_BxLxTxD + self.temporal_embedding[...].astype(x_BxLxTxD.dtype)
    h = self.temporal_attn(self.temporal_layer_norm1(x_BxLxTxD).reshape(b * l, t, d))
    x_BxLxTxD = x_BxLxTxD + h.reshape(b, l, t, d)
    return x_BxLxTxD.transpose(0, 2, 1, 3)

  def __call__(self, x_BxTxLxD):
    if self.temporal:
      x_BxTxLxD = self._temporal_block(x_BxTxLxD)
    b, t, l, d = x_BxTxLxD.shape
    h = self.self_attn(self.layer_norm1(x_BxTxLxD).reshape(b * t, l, d))
    x_BxTxLxD = x_BxTxLxD + h.reshape(b, t, l, d)
    return x_BxTxLxD + self.mlp(self.layer_norm2(x_BxTxLxD))


class VisionTower(nnx.Module):
  """Patch + class embeddings, pre-LayerNorm, then `num_layers` encoder layers."""

  def __init__(self, cfg: VisionConfig, num_layers: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_embedding = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID",
                                    use_bias=False, kernel_metadata=layers.logical(
                                        None, None, None, "embed"), **kw)
    normal = lambda shape: 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
    self.class_embedding = nnx.Param(normal((d,)), **layers.logical("embed"))
    self.position_embedding = nnx.Param(normal((cfg.num_patches + 1, d)),
                                        **layers.logical(None, "embed"))
    self.pre_layernorm = layers.layer_norm(d, cfg.layer_norm_eps, **kw)
    self.layers = nnx.List([VisionLayer(cfg, **kw) for _ in range(num_layers)])

  def embed_frames(self, videos_BxTxHxWx3):
    """Class token + patch embeddings + positions, [B, T, 1 + P, D]."""
    b, t, h, w, c = videos_BxTxHxWx3.shape
    if (h, w) != (self.config.image_size,) * 2:
      raise ValueError(f"frames are {h}x{w}, the tower expects {self.config.image_size}^2")
    patches = self.patch_embedding(videos_BxTxHxWx3.reshape(b * t, h, w, c).astype(self.dtype))
    patches_NxPxD = patches.reshape(b * t, -1, patches.shape[-1])
    cls_NxD = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                               (b * t, patches.shape[-1]))
    x = jnp.concatenate([cls_NxD[:, None], patches_NxPxD], axis=1)
    x = x + self.position_embedding[...].astype(self.dtype)
    return x.reshape(b, t, *x.shape[1:])

  def __call__(self, videos_BxTxHxWx3):
    if self.config.temporal_attention and videos_BxTxHxWx3.shape[1] != self.config.num_frames:
      raise ValueError(f"the temporal tower takes {self.config.num_frames} frames, "
                       f"got {videos_BxTxHxWx3.shape[1]}")
    x = self.pre_layernorm(self.embed_frames(videos_BxTxHxWx3))
    for layer in self.layers:
      x = layer(x)
    return x
