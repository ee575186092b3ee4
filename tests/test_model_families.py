"""The model interface: families by name, frozen groups, a second family through the loop."""
import dataclasses
import json

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.llava_next_video import modeling_llava_next_video

from isr_dpo_jax import bootstrap
from isr_dpo_jax import iterate
from isr_dpo_jax import models
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import train
from isr_dpo_jax.models import pooled_video_llava as pooled

# 4 frames of 32 px in 8 px patches: a 4 x 4 grid, pooled to 2 x 2.
TINY = models.VideoLlavaConfig(
    text=models.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                            num_layers=1, num_heads=2, num_kv_heads=1),
    vision=models.VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1,
                               num_heads=2, image_size=32, patch_size=8, num_frames=4,
                               temporal_attention=False),
    feature_layer=-1, feature_strategy="patch", video_token_id=63)


def _pooled_config(**overrides) -> pooled.PooledVideoLlavaConfig:
  fields = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}
  return pooled.PooledVideoLlavaConfig(**fields | overrides)


def test_pooled_features_are_llava_next_videos_average_pool_of_the_patches():
  """The same tower's patch features, pooled as transformers' LlavaNextVideoPooler pools."""
  videos = np.random.default_rng(0).standard_normal((2, 4, 32, 32, 3), np.float32)
  patches = np.array(models.VideoLlava(TINY, rngs=nnx.Rngs(0)).tower_features(videos))
  model = models.registry.get("pooled_video_llava").model(_pooled_config(), rngs=nnx.Rngs(0))
  pooler = modeling_llava_next_video.LlavaNextVideoPooler(transformers.LlavaNextVideoConfig(
      vision_config=dict(image_size=32, patch_size=8, hidden_size=8, num_attention_heads=2),
      spatial_pool_mode="average", spatial_pool_stride=2))
  expected = pooler(torch.from_numpy(patches.reshape(8, 16, 8))).numpy().reshape(2, 16, 8)
  np.testing.assert_allclose(np.asarray(model.tower_features(videos)), expected,
                             rtol=1e-5, atol=1e-6 * np.abs(expected).max())
  assert model.video.num_tokens == 4 * 2 * 2 == model.encode_video(videos).shape[1]


def test_pooling_needs_patch_features_in_a_grid_the_stride_divides():
  with pytest.raises(ValueError, match="stride 3"):
    _pooled_config(pool_stride=3)
  with pytest.raises(ValueError, match="'full' features"):
    _pooled_config(feature_strategy="full")


@pytest.mark.parametrize("family,config,layout,other", [
    ("pooled_video_llava", _pooled_config(), None, "video_llava"),  # its layout: original
    ("video_llava", TINY, "original", "pooled_video_llava"),  # 4 frames, no temporal
])
def test_a_family_loads_its_own_checkpoints_and_names_itself(tmp_path, family, config,
                                                              layout, other):
  model = models.registry.get(family).model(config, rngs=nnx.Rngs(1))
  models.save_pretrained(model, tmp_path, layout=layout)
  loaded = models.load_pretrained(tmp_path, family=family)
  assert type(loaded) is type(model) and loaded.config == model.config
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded)),
               nnx.to_pure_dict(nnx.state(model)))
  with pytest.raises(ValueError, match=f"holds a {family} model.*model.family='{family}'"):
    models.load_pretrained(tmp_path, family=other)


def test_an_unknown_family_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown model family 'qwen2_vl'; known: video_llava"):
    models.load_pretrained("/nonexistent", family="qwen2_vl")


@pytest.mark.parametrize("family", ["video_llava", "pooled_video_llava"])
def test_frozen_entries_name_parameter_groups_or_match_paths(family):
  """Group names resolve through the model's parameter_groups; others stay regexes."""
  cfg = {"video_llava": TINY, "pooled_video_llava": _pooled_config()}[family]
  model_class = models.registry.get(family).model
  model = nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model))
  frozen = train.frozen_mask(params, (*train.TrainConfig.frozen, r"^language_model/norm/"),
                             model.parameter_groups)
  by_module = {k: set(jax.tree.leaves(v)) for k, v in frozen.items()}
  assert by_module == {"video_tower": {True}, "multi_modal_projector": {True},
                       "language_model": {True, False}}
  assert frozen["language_model"]["norm"]["scale"]
  assert not frozen["language_model"]["embed_tokens"]["embedding"]


def test_the_loop_runs_a_second_family(tmp_path):
  """configs/smoke.py for one iteration on the pooled family: its tiny model is
  made, sampled, judged and trained through the interface alone."""
  config = conftest.load_config("smoke", **{"iterations": 1,
                                            "model.family": "pooled_video_llava"})
  (summary,) = iterate.run(config, tmp_path)
  saved = json.loads((tmp_path / "init" / "config.json").read_text())
  assert saved["model_family"] == "pooled_video_llava" and saved["spatial_pool_stride"] == 2
  assert summary["pairs"] > 0
  policy = policy_lib.Policy.from_config(config, bootstrap.prepare(config, tmp_path),
                                         mesh=None, params_dir=tmp_path / "iter_0" / "policy")
  assert type(policy.model) is pooled.PooledVideoLlava
  video = policy.model.video
  vision = policy.model.config.vision
  assert video.num_tokens == 8 * (vision.image_size // vision.patch_size // 2) ** 2
  prompt = policy.encoder.prompt("What color is the square?")
  assert np.sum(prompt == video.token_id) == video.num_tokens
  before = models.load_pretrained(tmp_path / "init", family="pooled_video_llava")
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                       nnx.to_pure_dict(nnx.state(policy.model)),
                       nnx.to_pure_dict(nnx.state(before)))
  assert any(jax.tree.leaves(moved["language_model"]))
  assert not any(jax.tree.leaves(moved["video_tower"]))
