"""Building blocks shared by the towers: annotated layers, activations, attention.

Every parameter carries logical axis names in its `out_sharding` metadata with
eager sharding off, so a model can be built without a mesh; parallel.py maps the
names onto a mesh and places the parameters (see parallel.LOGICAL_RULES).
"""
from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
from flax import nnx


def logical(*names: str | None) -> dict:
  """Variable metadata that names each axis of a parameter."""
  return {"out_sharding": names, "eager_sharding": False}


def dense(in_features: int, out_features: int, axes: tuple[str, str], *,
          use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear layer whose kernel [in, out] and bias [out] carry logical names."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    kernel_metadata=logical(*axes), bias_metadata=logical(axes[1]))


def layer_norm(features: int, eps: float, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs,
                       scale_metadata=logical("norm"), bias_metadata=logical("norm"))


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names used by the supported checkpoints; "gelu" is exact.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


# The name (jax.ad_checkpoint.checkpoint_name) of a decoder layer's input in
# training, so that a remat policy can keep it elsewhere (train.remat_policy).
LAYER_INPUT = "decoder_layer_input"

# Queries per block of a long attention: a block's float32 logits are what
# it holds at once (32 heads x 512 queries x 5,128 keys: 336 MB).
QUERY_BLOCK = 512


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS=None) -> jax.Array:
  """Scaled dot-product attention (GQA when K < N) with an optional boolean mask.

  More than QUERY_BLOCK queries go in blocks, one after another, each block
  recomputed in the backward pass, so the [B, N, T, S] logits never exist
  whole: for one 5,128-token row of a 7B they are 3.2 GiB per float32 copy,
  of which XLA's backward holds several at once.
  """
  length = q_BxTxNxH.shape[1]
  if length <= QUERY_BLOCK:
    return _attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
  if mask_BxTxS is None:
    mask_BxTxS = jnp.ones((1, length, k_BxSxKxH.shape[1]), bool)
  one_block = jax.checkpoint(lambda q, mask: _attention(q, k_BxSxKxH, v_BxSxKxH, mask))
  return in_query_blocks(one_block, q_BxTxNxH, mask_BxTxS, QUERY_BLOCK)


def in_query_blocks(attend, q_BxTxNxH, mask_BxTxS, block: int) -> jax.Array:
  """attend(q, mask) -> [B, T, N, H] over blocks of at most `block` queries.

  The blocks run one after another as a `lax.map`, so only one block's
  logits exist at a time (a Python loop of blocks leaves XLA free to run
  them all at once). Queries are padded to whole blocks with rows that see no
  key, and dropped. The mask's batch axis may be 1.
  """
  length = q_BxTxNxH.shape[1]
  if length <= block:
    return attend(q_BxTxNxH, mask_BxTxS)
  blocks = -(-length // block)
  size = -(-length // blocks)
  pad = blocks * size - length
  q_BxTxNxH = jnp.pad(q_BxTxNxH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask_BxTxS = jnp.pad(mask_BxTxS, ((0, 0), (0, pad), (0, 0)))
  by_block = lambda x: x.reshape(x.shape[0], blocks, size, *x.shape[2:]).swapaxes(0, 1)
  out_PxBxCxNxH = jax.lax.map(lambda q_mask: attend(*q_mask),
                              (by_block(q_BxTxNxH), by_block(mask_BxTxS)))
  out_BxTxNxH = out_PxBxCxNxH.swapaxes(0, 1).reshape(q_BxTxNxH.shape)
  return out_BxTxNxH[:, :length]


def _attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask)


def split_heads(x_BxLxF: jax.Array, head_dim: int) -> jax.Array:
  return x_BxLxF.reshape(*x_BxLxF.shape[:-1], -1, head_dim)


def merge_heads(x_BxLxNxH: jax.Array) -> jax.Array:
  return x_BxLxNxH.reshape(*x_BxLxNxH.shape[:-2], -1)
