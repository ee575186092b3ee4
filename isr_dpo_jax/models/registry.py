"""Model families by name: `config.model.family` picks one (docs/adding_a_model.md).

A family is a model class that implements models/interface.py, its config
dataclass, and the mapping between that config and a checkpoint's
config.json. checkpoints.py loads and saves any family through it; the
parameter names of a layout ("hf", "original") are checkpoints.py's.
"""
from collections.abc import Callable
import dataclasses
import os

from isr_dpo_jax.models import config as config_lib
from isr_dpo_jax.models import pooled_video_llava
from isr_dpo_jax.models.video_llava import VideoLlava

DEFAULT = "video_llava"


@dataclasses.dataclass(frozen=True)
class Family:
  """What it takes to build, load and save one kind of model.

  Attributes:
    model: the class, built as model(config, rngs=, dtype=, param_dtype=).
    config: its config dataclass.
    from_json: (config.json dict, checkpoint dir) -> (config, layout).
    to_json: (config, layout) -> config.json dict.
    save_layout: the layout `save_pretrained` writes unless told otherwise.
  """
  model: type
  config: type
  from_json: Callable[[dict, str | os.PathLike], tuple[object, str]]
  to_json: Callable[[object, str], dict]
  save_layout: str


FAMILIES = {
    "video_llava": Family(VideoLlava, config_lib.VideoLlavaConfig, config_lib.from_json,
                          config_lib.to_json, "hf"),
    "pooled_video_llava": Family(
        pooled_video_llava.PooledVideoLlava, pooled_video_llava.PooledVideoLlavaConfig,
        pooled_video_llava.from_json, pooled_video_llava.to_json, "original"),
}


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def of(model) -> tuple[str, Family]:
  """The name and family of a model instance (its exact class)."""
  for name, family in FAMILIES.items():
    if type(model) is family.model:
      return name, family
  raise ValueError(f"{type(model).__name__} is not a registered model family")
