"""LoRA: low-rank adapters on a model's Linear kernels, trained in its place.

A targeted kernel W [in, out] (flax's layout, y = x @ W + b; torch's Linear
stores W^T as [out, in]) gets two matrices A [in, r] and B [r, out], and its
layer computes

  y = x @ W + b + ((x @ A) @ B) * scale,    scale = alpha / r,

as peft's LoRA does, with peft's initialisation: A ~ U(-1/sqrt(in),
1/sqrt(in)) (its kaiming-uniform), B = 0, so that an adapted model starts equal
to its base. `merge` folds the adapters into the kernels, W + (A @ B) * scale:
a plain model with the parameter tree of the base.

Adapters are a pure dict that mirrors the parameter tree down to each adapted
Linear module and holds `lora_a` and `lora_b` there, e.g.
`adapters["language_model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]`.
Which kernels and how much: settings.LoraConfig (config.train.lora). Its
targets are regexes over parameter paths, as TrainConfig.frozen's are; each
2-D `kernel` whose path one matches gets an adapter. Nothing here needs
weights: `shardings` reads shapes, and `init` and `merge` trace under
`jax.eval_shape` or `jit(...).lower` from `jax.ShapeDtypeStruct` trees, e.g.
`jax.eval_shape(init, abstract_params, config, key)` to plan a run.

In training (train.Trainer) the base stays frozen: the step differentiates the
adapters alone, `attach` runs each low-rank path beside its frozen kernel, so
no full-size kernel gradient is computed and no merged copy of the kernels is
held, and only the adapters get optimizer state and go into checkpoints.
"""
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from isr_dpo_jax import settings


def _name(path: tuple) -> str:
  return "/".join(map(str, path))


def targets(params, patterns: Iterable[str]) -> list[tuple]:
  """Paths of the modules whose 2-D `kernel` a pattern matches, in tree order.

  Raises ValueError for a pattern that matches no such kernel (a typo would
  otherwise train nothing).
  """
  kernels = [path for path, x in traverse_util.flatten_dict(params).items()
             if path[-1] == "kernel" and len(x.shape) == 2]
  regexes = [re.compile(p) for p in patterns]
  for regex in regexes:
    if not any(regex.search(_name(path)) for path in kernels):
      examples = ", ".join(_name(path) for path in kernels[:2])
      raise ValueError(f"LoRA target {regex.pattern!r} matches no 2-D kernel "
                       f"(kernel paths look like {examples})")
  return [path[:-1] for path in kernels
          if any(regex.search(_name(path)) for regex in regexes)]


def init(params, config: settings.LoraConfig, key: jax.Array) -> dict:
  """New adapters for `params`' targeted kernels: A as peft draws it, B = 0."""
  modules = targets(params, config.targets)
  flat = traverse_util.flatten_dict(params)
  adapters = {}
  for module, module_key in zip(modules, jax.random.split(key, len(modules))):
    kernel = flat[module + ("kernel",)]
    fan_in, fan_out = kernel.shape
    bound = fan_in ** -0.5
    adapters[module + ("lora_a",)] = jax.random.uniform(
        module_key, (fan_in, config.rank), kernel.dtype, -bound, bound)
    adapters[module + ("lora_b",)] = jnp.zeros((config.rank, fan_out), kernel.dtype)
  return traverse_util.unflatten_dict(adapters)


def shardings(adapters, param_shardings) -> dict:
  """NamedShardings of the adapters: A's rows as its kernel's, B's columns as
  its kernel's, the rank axis replicated."""
  kernels = traverse_util.flatten_dict(param_shardings)
  out = {}
  for path in traverse_util.flatten_dict(adapters):
    kernel = kernels[path[:-1] + ("kernel",)]
    spec = tuple(kernel.spec) + (None,) * (2 - len(kernel.spec))
    axes = (spec[0], None) if path[-1] == "lora_a" else (None, spec[1])
    out[path] = NamedSharding(kernel.mesh, P(*axes))
  return traverse_util.unflatten_dict(out)


def _modules(adapters) -> dict[tuple, dict]:
  """{module path: {"lora_a": A, "lora_b": B}}."""
  modules = {}
  for path, x in traverse_util.flatten_dict(adapters).items():
    modules.setdefault(path[:-1], {})[path[-1]] = x
  return modules


def merge(params, adapters, scale: float) -> dict:
  """`params` with W + (A @ B) * scale for each adapted kernel (same tree, dtypes)."""
  modules = _modules(adapters)

  def merged(path, w):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    pair = modules.get(keys[:-1]) if keys[-1] == "kernel" else None
    if pair is None:
      return w
    delta = jnp.matmul(pair["lora_a"], pair["lora_b"],
                       precision=jax.lax.Precision.HIGHEST) * scale
    return (w + delta).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(merged, params)


class Adapted(nnx.Module):
  """A Linear layer and its low-rank path: base(x) + ((x @ A) @ B) * scale.

  The low-rank path runs in the layer's compute dtype and precision.
  """

  def __init__(self, base: nnx.Linear, lora_a: jax.Array, lora_b: jax.Array,
               scale: float):
    self.base = base
    self.lora_a = nnx.LoRAParam(lora_a)
    self.lora_b = nnx.LoRAParam(lora_b)
    self.scale = scale

  def __call__(self, x):
    base = self.base
    x_low, a, b = base.promote_dtype((x, self.lora_a[...], self.lora_b[...]),
                                     dtype=base.dtype)
    low_rank = jnp.matmul(jnp.matmul(x_low, a, precision=base.precision), b,
                          precision=base.precision)
    return base(x) + low_rank * self.scale


def attach(model: nnx.Module, adapters, scale: float) -> nnx.Module:
  """`model` with each adapted Linear replaced by `Adapted` (in place).

  The model's own code then runs the low-rank paths: call it on a model
  merged inside the traced function (nnx.merge), so that the adapters are
  the differentiated inputs and the base is left as it was.
  """
  for path, pair in _modules(adapters).items():
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    linear = parent[key] if isinstance(key, int) else getattr(parent, key)
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"LoRA adapts nnx.Linear layers; {_name(path)} is a "
                      f"{type(linear).__name__}")
    adapted = Adapted(linear, pair["lora_a"], pair["lora_b"], scale)
    if isinstance(key, int):
      parent[key] = adapted
    else:
      setattr(parent, key, adapted)
  return model
