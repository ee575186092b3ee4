"""load_pretrained / save_pretrained: layouts, round trips, dtype, refusals, errors."""
import dataclasses
import json
import pathlib
import pickle
import re
import shutil

import hf_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from isr_dpo_jax import models
from isr_dpo_jax.models import config as config_lib


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  hf = ref.tiny_model(seed=7)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  return hf, path


@pytest.fixture(scope="module")
def model(hf_checkpoint):
  return models.load_pretrained(hf_checkpoint[1])


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))


def _copy_with_tensors(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  save_file(edit(tensors), dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_hf_save_loads_in_transformers_exactly(hf_checkpoint, model, tmp_path):
  hf, _ = hf_checkpoint
  models.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded, info = transformers.VideoLlavaForConditionalGeneration.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids, mask = ref.video_prompts([6, 4], model.config.num_video_tokens)
  frames = ref.videos(2)
  np.testing.assert_array_equal(ref.logits(reloaded.eval(), ids, mask, frames),
                                ref.logits(hf, ids, mask, frames))
  _assert_same_params(models.load_pretrained(tmp_path), model)


# transformers' save_pretrained writes language_model.model.*, video_tower.*, ...
_KEY_VARIANTS = {
    "published Video-LLaVA-7B-hf": ((r"^(video|image)_tower\.", r"\1_tower.vision_model."),),
    "transformers module names": ((r"^language_model\.model\.", "model.language_model."),
                                  (r"^language_model\.lm_head\.", "lm_head."),
                                  (r"^(?!model\.|lm_head)", "model.")),
}


@pytest.mark.parametrize("variant", sorted(_KEY_VARIANTS))
def test_other_hf_key_names_load(hf_checkpoint, model, tmp_path, variant):
  def rename(tensors):
    out = {}
    for key, value in tensors.items():
      for pattern, repl in _KEY_VARIANTS[variant]:
        key = re.sub(pattern, repl, key)
      out[key] = value
    return out

  path = _copy_with_tensors(hf_checkpoint[1], tmp_path / "renamed", rename)
  config = json.loads((path / "config.json").read_text())
  text = config["text_config"]  # The older rope_theta field instead of rope_parameters.
  text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
  (path / "config.json").write_text(json.dumps(config))
  _assert_same_params(models.load_pretrained(path), model)


def _random_temporal_model() -> models.VideoLlava:
  cfg = models.VideoLlavaConfig(
      text=models.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1,
                              num_heads=2, num_kv_heads=1, rms_norm_eps=1e-5),
      vision=models.VisionConfig(hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2,
                                 image_size=28, num_frames=2, temporal_attention=True),
      feature_strategy="patch", projector="linear", video_token_id=-201)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.VideoLlava(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), state))


def test_original_layout_round_trip_is_exact(tmp_path):
  model = _random_temporal_model()
  models.save_pretrained(model, tmp_path, layout="original", max_shard_bytes=4_000)
  keys = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  assert "model.video_tower.video_tower.encoder.layers.1.temporal_attn.q_proj.weight" in keys
  assert "model.mm_projector.weight" in keys and "model.layers.0.mlp.up_proj.weight" in keys
  loaded = models.load_pretrained(tmp_path)
  # Only the two tower layers in use are written; layer -1 of those is layer -2 of three.
  vision = dataclasses.replace(model.config.vision, num_layers=2)
  assert loaded.config == dataclasses.replace(model.config, vision=vision, feature_layer=-1)
  _assert_same_params(loaded, model)


def test_hf_layout_refuses_a_temporal_tower(tmp_path):
  with pytest.raises(ValueError, match="layout='original'"):
    models.save_pretrained(_random_temporal_model(), tmp_path)


def test_load_casts_each_tensor_to_the_parameter_dtype(hf_checkpoint, model):
  bf16 = models.load_pretrained(hf_checkpoint[1], dtype=jnp.bfloat16)
  kernel = bf16.language_model.layers[0].self_attn.q_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      kernel, model.language_model.layers[0].self_attn.q_proj.kernel[...].astype(jnp.bfloat16))


class _Trap:
  """Creates a file when unpickled: loading must never get that far."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.touch, (self.marker,)


def test_pickled_weights_are_refused(hf_checkpoint, tmp_path):
  shutil.copy(hf_checkpoint[1] / "config.json", tmp_path)
  marker = tmp_path / "unpickled"
  (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*refusing to unpickle"):
    models.load_pretrained(tmp_path)
  assert not marker.exists()


def test_missing_and_unexpected_keys_are_listed(hf_checkpoint, tmp_path):
  def edit(tensors):
    tensors["language_model.model.layers.0.extra.weight"] = np.zeros(2, np.float32)
    del tensors["language_model.model.norm.weight"]
    return tensors

  path = _copy_with_tensors(hf_checkpoint[1], tmp_path / "bad", edit)
  with pytest.raises(ValueError) as error:
    models.load_pretrained(path)
  assert "['model.language_model.norm.weight']" in str(error.value)
  assert "unexpected keys: ['language_model.model.layers.0.extra.weight']" in str(error.value)


def test_wrong_shape_names_file_and_key(hf_checkpoint, tmp_path):
  key = "multi_modal_projector.linear_2.bias"

  def edit(tensors):
    tensors[key] = np.zeros(3, np.float32)
    return tensors

  path = _copy_with_tensors(hf_checkpoint[1], tmp_path / "bad", edit)
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor {key} has shape \(3,\)"):
    models.load_pretrained(path)


def test_tokenizer_is_saved_and_loaded(model, tmp_path):
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "video": 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                   bos_token="<s>", eos_token="</s>")
  models.save_pretrained(model, tmp_path, tokenizer=tokenizer)
  loaded = models.load_tokenizer(tmp_path)
  assert loaded("a video b")["input_ids"] == [3, 4, 0]
  assert loaded.eos_token_id == 2


def test_original_tower_config_sources(tmp_path):
  entry = {"mm_video_tower": "towers/lb", "video_tower_config": {"num_hidden_layers": 2}}
  assert config_lib.tower_from_original(entry, tmp_path)["num_hidden_layers"] == 2
  local = {"mm_video_tower": "towers/lb"}
  assert config_lib.tower_from_original(local, tmp_path) == config_lib.LANGUAGEBIND_VIDEO_MERGE
  (tmp_path / "towers/lb").mkdir(parents=True)
  (tmp_path / "towers/lb/config.json").write_text(json.dumps({"vision_config": {"num_frames": 4}}))
  tower = config_lib.tower_from_original(local, tmp_path)
  assert tower["num_frames"] == 4 and tower["add_time_attn"] and tower["hidden_size"] == 1024


def test_unknown_config_is_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    models.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type 'bert'"):
    models.load_pretrained(tmp_path)
