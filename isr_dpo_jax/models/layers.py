"""Building blocks shared by the towers: annotated layers, activations, attention.

Every parameter carries logical axis names in its `out_sharding` metadata with
eager sharding off, so a model can be built without a mesh; parallel.py maps the
names onto a mesh and places the parameters (see parallel.LOGICAL_RULES).
"""
from collections.abc import Callable
import functools

import jax
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


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS=None) -> jax.Array:
  """Scaled dot-product attention (GQA when K < N) with an optional boolean mask."""
  mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask)


def split_heads(x_BxLxF: jax.Array, head_dim: int) -> jax.Array:
  return x_BxLxF.reshape(*x_BxLxF.shape[:-1], -1, head_dim)


def merge_heads(x_BxLxNxH: jax.Array) -> jax.Array:
  return x_BxLxNxH.reshape(*x_BxLxNxH.shape[:-2], -1)
