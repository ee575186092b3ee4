"""Safetensors checkpoints <-> a model family, streamed tensor by tensor and sharded.

The family (registry.py) builds the model and maps config.json to its config;
the parameter names of each layout are those of the LLaVA models, below.

Layouts read:
  * "hf": transformers `VideoLlavaForConditionalGeneration`: the names its
    save_pretrained writes (`language_model.model.*`, `language_model.lm_head.*`,
    `video_tower.*`, `multi_modal_projector.*`), those of the published
    Video-LLaVA-7B-hf (`video_tower.vision_model.*`) or its in-memory module
    names (`model.language_model.*`, `model.video_tower.*`, `lm_head.*`).
  * "original": Video-LLaVA / LLaVA-Hound `llava_llama` (`model.layers.*`,
    `model.mm_projector.{0,2}.*`, `model.video_tower.video_tower.*` with the
    LanguageBind temporal attention weights).

Every checkpoint key is first renamed to transformers' module ("canonical") name;
each model parameter knows its canonical name and how its axes map onto the
stored tensor. Loading builds the model abstractly (nnx.eval_shape), then reads
one tensor at a time and places it with `jax.make_array_from_callback`, each
device's slice cast to the parameter dtype on its own: beyond the model itself,
host memory holds one stored tensor and one slice at a time.
Pickled weights (.bin, .pt, ...) are refused: unpickling can run arbitrary code.

Ignored on load: the image tower (the model is video only), tower layers after
the selected feature layer and the tower's post-LayerNorm (they never affect the
features), rotary / position-id buffers, and lm_head when embeddings are tied.
"""
from collections.abc import Callable
import json
import os
import re
import stat

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (lets NumPy, hence safetensors, read bfloat16)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from isr_dpo_jax import parallel
from isr_dpo_jax.models import config as config_lib
from isr_dpo_jax.models import interface
from isr_dpo_jax.models import registry

_INDEX_FILE = "model.safetensors.index.json"
_FAMILY_KEY = "model_family"  # in the config.json that save_pretrained writes
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Parameter path (joined with ".") -> canonical key, applied in order.
_PARAM_TO_CANONICAL = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.", "model.language_model."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^video_tower\.(patch_embedding|class_embedding|position_embedding)",
     r"model.video_tower.embeddings.\1"),
    (r"^video_tower\.pre_layernorm\.", "model.video_tower.pre_layrnorm."),
    (r"^video_tower\.layers\.", "model.video_tower.encoder.layers."),
    (r"position_embedding$", "position_embedding.weight"),
    (r"\.(kernel|scale|embedding)$", ".weight"),
)
# Stored key -> canonical key, per layout.
_TO_CANONICAL = {
    "hf": (
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^(image|video)_tower\.", r"model.\1_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^model\.(image|video)_tower\.vision_model\.", r"model.\1_tower."),
    ),
    "original": (
        (r"^model\.(image|video)_tower\.\1_tower\.", r"model.\1_tower."),
        (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
        (r"^model\.mm_projector\.", "model.multi_modal_projector.linear_1."),
        (r"^model\.(?!(image|video)_tower\.|multi_modal_projector\.)",
         "model.language_model."),
    ),
}
# Canonical key -> the names transformers 5 `save_pretrained` writes for VideoLlava.
_CANONICAL_TO_HF = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.", ""),
)


def _rename(key: str, rules) -> str:
  for pattern, repl in rules:
    key = re.sub(pattern, repl, key)
  return key


def _axes_order(path: tuple, ndim: int) -> tuple[int, ...] | None:
  """Permutation p with param = stored.transpose(p), or None when identical."""
  if path[-1] != "kernel":
    return None
  return (1, 0) if ndim == 2 else (2, 3, 1, 0)  # Linear [out, in]; Conv [out, in, kh, kw].


def _canonical_names(state) -> dict[tuple, str]:
  """Parameter path -> canonical key (transformers' module name)."""
  return {path: _rename(".".join(map(str, path)), _PARAM_TO_CANONICAL)
          for path, _ in nnx.to_flat_state(state)}


def _ignored(key: str, cfg: config_lib.VideoLlavaConfig) -> bool:
  if key.startswith("model.image_tower.") or key.startswith("model.video_tower.post_layernorm."):
    return True
  if re.search(r"\.(position_ids|inv_freq)$", key):
    return True
  if cfg.text.tie_word_embeddings and key == "lm_head.weight":
    return True
  layer = re.match(r"model\.video_tower\.encoder\.layers\.(\d+)\.", key)
  return bool(layer) and int(layer.group(1)) >= cfg.num_tower_layers


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read_config(path: str | os.PathLike, family: str = registry.DEFAULT) -> tuple[object, str]:
  """The family's config and the layout of a checkpoint directory.

  A config.json that `save_pretrained` wrote names its family (`model_family`):
  reading it as another family is an error, not a different model.
  """
  from_json = registry.get(family).from_json
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: no config.json in the checkpoint directory")
  with open(config_path) as f:
    d = json.load(f)
  if d.get(_FAMILY_KEY, family) != family:
    raise ValueError(f"{config_path} holds a {d[_FAMILY_KEY]} model, not {family} "
                     f"(set model.family={d[_FAMILY_KEY]!r})")
  try:
    return from_json(d, path)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from None


def _weight_map(path: str | os.PathLike) -> dict[str, str]:
  """Stored key -> safetensors file, from the index or by listing the files."""
  index_path = os.path.join(path, _INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    pickled = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
    if pickled:
      raise ValueError(
          f"{path}: only pickled weights ({', '.join(pickled)}); refusing to unpickle them "
          "(loading a pickle can run arbitrary code). Convert them to safetensors first.")
    raise FileNotFoundError(f"{path}: no .safetensors weights")
  weight_map = {}
  for name in files:
    file_path = os.path.join(path, name)
    with safe_open(file_path, framework="numpy") as f:
      weight_map.update({k: file_path for k in f.keys()})
  return weight_map


def _match_keys(names: dict[tuple, str], weight_map: dict[str, str], layout: str,
                cfg, path) -> dict[tuple, str]:
  """Parameter path -> stored key; raises on missing or unexpected keys."""
  stored = {_rename(k, _TO_CANONICAL[layout]): k for k in weight_map}
  missing = sorted(key for key in names.values() if key not in stored)
  wanted = set(names.values())
  unexpected = sorted(stored[c] for c in stored if c not in wanted and not _ignored(c, cfg))
  if missing or unexpected:
    raise ValueError(f"{path} ({layout} layout) does not match the model:\n"
                     f"  missing keys (as transformers module names): {missing}\n"
                     f"  unexpected keys: {unexpected}")
  return {p: stored[key] for p, key in names.items()}


def _put_sharded(tensor: np.ndarray, key: str, file_path: str, target: jax.ShapeDtypeStruct,
                 sharding, perm) -> jax.Array:
  """Places a stored tensor on `sharding`, each device's slice cast on its own."""
  ours = tensor.shape if perm is None else tuple(tensor.shape[i] for i in perm)
  if ours != target.shape:
    raise ValueError(f"{file_path}: tensor {key} has shape {tensor.shape}, "
                     f"the model expects {target.shape} (in stored order {ours})")
  inverse = None if perm is None else np.argsort(perm)

  def read(index):
    stored_index = index if perm is None else tuple(index[i] for i in inverse)
    x = tensor[stored_index]
    return (x if perm is None else x.transpose(perm)).astype(target.dtype, copy=False)

  return jax.make_array_from_callback(target.shape, sharding, read)


def load_pretrained(path: str | os.PathLike, *, family: str = registry.DEFAULT,
                    dtype=jnp.float32, param_dtype=None,
                    mesh: jax.sharding.Mesh | None = None,
                    rules=parallel.LOGICAL_RULES) -> interface.VideoLanguageModel:
  """Loads a model of `family` from a checkpoint directory (layout from config.json).

  dtype is the compute dtype, param_dtype (default: dtype) the storage dtype.
  With a mesh, every parameter is placed on its sharding by `rules`; otherwise
  on the default device.
  """
  cfg, layout = read_config(path, family)
  param_dtype = param_dtype or dtype
  model_class = registry.get(family).model
  abstract = nnx.eval_shape(
      lambda: model_class(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  else:
    shardings = parallel.state_shardings(state, mesh, rules)
  weight_map = _weight_map(path)
  stored_keys = _match_keys(_canonical_names(state), weight_map, layout, cfg, path)
  flat_shardings = dict(nnx.to_flat_state(shardings))
  by_file: dict[str, list] = {}
  for param_path, var in nnx.to_flat_state(state):
    by_file.setdefault(weight_map[stored_keys[param_path]], []).append((param_path, var))
  loaded = []
  for file_path, params in by_file.items():
    # pread: a tensor is read into one host buffer, freed once placed (no mmap
    # pages of the whole file stay resident).
    with safe_open(file_path, framework="numpy", backend="pread") as handle:
      for param_path, var in params:
        key, target = stored_keys[param_path], var.get_value()
        array = _put_sharded(handle.get_tensor(key), key, file_path, target,
                             flat_shardings[param_path].get_value(),
                             _axes_order(param_path, target.ndim))
        loaded.append((param_path, var.replace(array)))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def load_tokenizer(path: str | os.PathLike):
  """The checkpoint's tokenizer through transformers' AutoTokenizer (local files only)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _original_key(key: str, cfg: config_lib.VideoLlavaConfig) -> str:
  first = "model.mm_projector." if cfg.projector == "linear" else "model.mm_projector.0."
  return _rename(key, (
      (r"^model\.language_model\.", "model."),
      (r"^model\.video_tower\.", "model.video_tower.video_tower."),
      (r"^model\.multi_modal_projector\.linear_1\.", first),
      (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
  ))


def _stored_tensors(model, layout: str) -> list[tuple[str, int, Callable]]:
  """(stored key, bytes, host tensor thunk) for everything save_pretrained writes."""
  cfg = model.config
  state = nnx.state(model, nnx.Param)
  names = _canonical_names(state)
  tensors, image_tower = [], []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    perm = _axes_order(path, value.ndim)
    inverse = None if perm is None else tuple(np.argsort(perm))
    thunk = lambda v=value, inv=inverse: np.ascontiguousarray(
        _to_host(v) if inv is None else _to_host(v).transpose(inv))
    key = names[path]
    if layout == "original":
      tensors.append((_original_key(key, cfg), value.nbytes, thunk))
      continue
    tensors.append((_rename(key, _CANONICAL_TO_HF), value.nbytes, thunk))
    if key.startswith("model.video_tower."):
      # transformers always builds an image tower: write a copy of the video tower.
      image_tower.append((_rename(key, _CANONICAL_TO_HF).replace("video_tower.", "image_tower.", 1),
                          value.nbytes, thunk))
  if layout == "hf":
    # The post-LayerNorm only pools the class token for CLIP's image head, never
    # the selected features: write its initial values so transformers loads cleanly.
    d = cfg.vision.hidden_size
    for tower in ("video", "image"):
      for name, fill in (("weight", np.ones), ("bias", np.zeros)):
        tensors.append((f"{tower}_tower.post_layernorm.{name}", 4 * d,
                        lambda fill=fill: fill((d,), np.float32)))
  return tensors + image_tower


def _plan_shards(tensors, max_shard_bytes: int) -> list[list]:
  shards, size = [[]], 0
  for item in tensors:
    if shards[-1] and size + item[1] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  return shards


def save_pretrained(model, path: str | os.PathLike, *, layout: str | None = None,
                    tokenizer=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json and safetensors shards (+ index) in the given layout.

  layout None is the model family's `save_layout`. "hf" is what transformers 5
  writes for VideoLlavaForConditionalGeneration and loads without missing
  weights; it needs a plain CLIP tower, "full" features and the mlp2x_gelu
  projector. "original" is the llava_llama layout (LanguageBind
  temporal tower supported). Only the tower layers the model holds are written;
  the config then selects their output (feature layer -1), the same features.
  Tensors are fetched to the host one shard file at a time; process 0 writes.
  """
  name, family = registry.of(model)
  layout = layout or family.save_layout
  if layout not in _TO_CANONICAL:
    raise ValueError(f"layout must be one of {sorted(_TO_CANONICAL)}, got {layout!r}")
  config_dict = family.to_json(model.config, layout) | {_FAMILY_KEY: name}
  shards = _plan_shards(_stored_tensors(model, layout), max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  write = jax.process_index() == 0
  config_path = os.path.join(path, "config.json")
  if write:
    os.makedirs(path, exist_ok=True)
    with open(config_path, "w") as f:
      json.dump(config_dict, f, indent=2)
  weight_map = {}
  for name, shard in zip(names, shards):
    arrays = {key: thunk() for key, _, thunk in shard}
    if write:
      save_file(arrays, os.path.join(path, name), metadata={"format": "pt"})
      # safetensors writes through a 0600 temporary file: give the shard the
      # mode that config.json got from the umask.
      os.chmod(os.path.join(path, name), stat.S_IMODE(os.stat(config_path).st_mode))
    weight_map.update({key: name for key in arrays})
  if write and len(shards) > 1:
    total = sum(item[1] for shard in shards for item in shard)
    with open(os.path.join(path, _INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if write and tokenizer is not None:
    tokenizer.save_pretrained(os.fspath(path))
