"""Every config builds and validates; the 7B one abstractly (mesh, shapes,
shardings, no weights); settings.validate rejects what cannot work; configs
are data (loading one imports no jax), and settings turns them into the typed
settings whose defaults they read."""
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from isr_dpo_jax import defaults
from isr_dpo_jax import judge
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import settings
from isr_dpo_jax import train

# The commands each config is for (the 7B one needs its files: below).
COMMANDS = {"smoke": ("iterate", "sft", "eval"), "demo": ("demo", "iterate")}


@pytest.mark.parametrize("name", sorted(p.stem for p in conftest.CONFIGS.glob("*.py")))
def test_config_loads_and_trains_with_a_valid_recipe(name):
  config = conftest.load_config(name)
  train_config = settings.dpo_train_config(config)
  assert train_config.loss_type in settings.LOSS_TYPES
  assert config.sampling.batch_size % 8 == 0  # divides the CPU test mesh
  for command in COMMANDS.get(name, ()):
    settings.validate(config, command)


def test_video_llava_7b_validates_where_its_files_are(tmp_path, monkeypatch):
  config = conftest.load_config("video_llava_7b")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(settings.ConfigError,
                     match="model.checkpoint='checkpoints/LLaVA-Hound-SFT': no such"):
    settings.validate(config, "iterate")
  for path in (config.model.checkpoint, config.data.video_root):
    (tmp_path / path).mkdir(parents=True)
  (tmp_path / config.data.prompts).parent.mkdir(parents=True)
  (tmp_path / config.data.prompts).touch()
  with pytest.raises(settings.ConfigError, match="eval.test_sets: .*msvd"):
    settings.validate(config, "iterate")
  (tmp_path / config.eval.test_root).mkdir(parents=True)
  for name in config.eval.test_sets:
    (tmp_path / config.eval.test_root / f"{name}.qa.jsonl").touch()
  settings.validate(config, "iterate")


@pytest.mark.parametrize("overrides, message", [
    ({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1},
     "label_smoothing=0.1: label smoothing .* with dpo.loss_type='sigmoid' only"),
    ({"sampling.answer.top_p": 0.0}, r"sampling.answer.top_p=0.0: must be a number in \(0, 1\]"),
    ({"sampling.buckets": (128, 64)}, "sampling.buckets=.*: must be increasing"),
    ({"train.remat": "nothing_savable"}, "did you mean 'nothing_saveable'"),
    ({"train.frozen": ("video_tower/(",)}, "train.frozen=.*regular expressions"),
    ({"train.lora.rank": 8, "train.lora.targets": ()}, "LoRA would train nothing"),
    ({"mesh": {"data": -1, "fsdp": -1, "tensor": 1}}, "with at most one -1"),
    ({"data.template": "vicuna_v2"}, "data.template='vicuna_v2': must be a registered"),
    ({"eval.scoring": "exact"}, "eval.scoring='exact': must be one of judge, match"),
])
def test_validate_rejects_what_cannot_work(overrides, message):
  config = conftest.load_config("smoke")
  config.unlock()
  for key, value in overrides.items():
    if key == "mesh":
      config.mesh = value
    else:
      config.update_from_flattened_dict({key: value})
  with pytest.raises(settings.ConfigError, match=message):
    settings.validate(config, "iterate")


def test_remat_policies_are_jax_policies():
  for name in settings.REMAT_POLICIES:
    assert callable(train.remat_policy(name)), name


# What loading a config must not import: the command line checks a config
# before any of these, and a config is data.
HEAVY = ("jax", "flax", "orbax", "openai", "av", "torch", "transformers")


def test_loading_every_config_imports_nothing_heavy():
  code = f"""
import importlib.util, pathlib, sys
from isr_dpo_jax import defaults
defaults.get_config()
for path in sorted(pathlib.Path({str(conftest.CONFIGS)!r}).glob("*.py")):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.get_config()
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def test_the_defaults_are_the_typed_settings_defaults():
  """Each default is written once: the config's train and dpo sections are
  settings.TrainConfig's, and every key that names a field reaches it."""
  config = defaults.get_config()
  assert settings.dpo_train_config(config) == settings.TrainConfig()
  assert config.sampling.buckets == settings.BUCKETS
  assert settings.prompts(config) == judge.Prompts()
  config.update_from_flattened_dict({
      "train.learning_rate": 1e-3, "train.remat": "nothing_saveable",
      "train.frozen": [settings.VIDEO_TOWER], "train.lora.rank": 4,
      "dpo.beta": 0.5, "dpo.loss_type": "ipo", "sft.learning_rate": 3e-4})
  recipe = settings.dpo_train_config(config)
  assert (recipe.learning_rate, recipe.remat, recipe.frozen, recipe.lora.rank,
          recipe.beta, recipe.loss_type) == (1e-3, "nothing_saveable",
                                             (settings.VIDEO_TOWER,), 4, 0.5, "ipo")
  sft = settings.sft_train_config(config)
  assert (sft.learning_rate, sft.schedule, sft.frozen, sft.remat, sft.lora) == (
      3e-4, config.sft.schedule, tuple(config.sft.frozen), "nothing_saveable",
      recipe.lora)
  answer = settings.sampling_params(config.sampling.answer)
  assert dict(config.sampling.answer) == {
      name: getattr(answer, name) for name in config.sampling.answer}


@pytest.mark.parametrize("name", sorted(defaults.get_config().self_judge))
def test_the_loop_s_judge_keys_under_their_old_name_say_the_new_one(name):
  """config.judge was renamed self_judge (config.eval.judge is the
  evaluation's); the old keys name the new ones, not the evaluation's."""
  error = settings.unknown_key(defaults.get_config(), f"judge.{name}")
  assert str(error).endswith(f"did you mean self_judge.{name}?")


def test_the_ground_truth_judge_is_valid_on_the_synthetic_world_only():
  config = conftest.load_config("smoke", **{"self_judge.mode": "ground_truth"})
  settings.validate(config, "iterate")
  config.world = None
  with pytest.raises(settings.ConfigError,
                     match="self_judge.mode='ground_truth': .*config.world is None"):
    settings.validate(config, "iterate")


def test_video_llava_7b_builds_its_mesh_shapes_and_shardings_abstractly():
  config = conftest.load_config("video_llava_7b")
  mesh = parallel.make_mesh(dict(config.mesh))  # 8 CPU devices: fsdp 8
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  model = nnx.eval_shape(lambda: models.VideoLlava(
      models.VideoLlavaConfig(), rngs=nnx.Rngs(0),
      dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.float32))
  trainer = train.Trainer(model, settings.dpo_train_config(config), mesh,
                          total_steps=100)
  state = trainer.abstract_state()

  def size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))

  def bytes_per_device(tree):
    return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))

  llm = size(state.params["language_model"])
  assert 6.7e9 < llm < 6.8e9  # Vicuna-7B
  # LanguageBind ViT-L/14: 23 of 24 layers feed layer -2; each has CLIP's
  # attention, MLP and 2 LayerNorms plus temporal attention, LayerNorm and a
  # [8, 1024] temporal embedding; then patch, class and position embeddings.
  d, f = 1024, 4096
  attention = 4 * (d * d + d)
  spatial = attention + (d * f + f + f * d + d) + 2 * 2 * d
  temporal = attention + 2 * d + 8 * d
  embeddings = 14 * 14 * 3 * d + d + 257 * d + 2 * d
  assert size(state.params["video_tower"]) == 23 * (spatial + temporal) + embeddings
  # Adam moments for the LLM only: tower and projector are frozen (the
  # lineage's recipe); a few scalars (step counts) besides.
  assert 0 <= size(state.opt_state) - 2 * llm < 16
  # FSDP spreads parameters and optimizer state evenly over the 8 devices.
  total = 4 * (size(state.params) + size(state.opt_state))
  assert bytes_per_device((state.params, state.opt_state)) < 1.02 * total / 8
