"""One device mesh with axes ('data', 'fsdp', 'tensor') and the logical-axis rules.

Model parameters name their axes logically (see models/layers.py); the rules
below map those names onto mesh axes. Parameters are loaded straight into their
shardings (models.load_pretrained): never one full host copy of the model.
"""
from collections.abc import Sequence
import functools
import math

import flax.core.spmd
import jax
from jax.sharding import PartitionSpec as P
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")
# The axes a batch's rows (examples) split over: data parallelism and FSDP.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated). FSDP shards the model dimension,
# tensor parallelism the heads, MLP and vocabulary dimensions.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh over ('data', 'fsdp', 'tensor'); missing axes are 1, one -1 is inferred.

  e.g. make_mesh({"fsdp": -1, "tensor": 2}) on 8 devices -> data 1, fsdp 4, tensor 2.
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  devices = jax.devices() if devices is None else devices
  sizes = [shape.get(axis, 1) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not cover {len(devices)} devices")
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def shard_rows(x: jax.Array) -> jax.Array:
  """`x` with its rows (leading axis) split over BATCH_AXES, when traced under
  a mesh that has them (`jax.sharding.use_abstract_mesh`); else `x`.

  FSDP splits the weights' model dimension over 'fsdp', the axis that also
  splits the rows. Left free between layers, XLA may bring every device's
  rows to each weight shard instead of gathering the weights: in a 7B MLP
  that is a [devices x rows, length, 11008] partial sum, 0.9 GB per layer for
  one 5,128-token row per chip on 8 chips.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  spec = P(BATCH_AXES, *[P.UNCONSTRAINED] * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, spec)


def on_mesh(fn, mesh: jax.sharding.Mesh | None):
  """`fn`, traced under `mesh` (when there is one) so that the model's layers
  keep their activations' rows on the batch axes (`shard_rows`)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def traced_on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced_on_mesh


def state_shardings(state, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedShardings (same tree as `state`) from each variable's logical axes."""
  with flax.core.spmd.logical_axis_rules(rules):
    return nnx.get_named_sharding(state, mesh)

