"""VideoLlava against transformers' VideoLlavaForConditionalGeneration (float32, CPU)."""
import dataclasses

import hf_reference as ref
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from isr_dpo_jax import models

PROMPT_LENGTHS = [7, 4]


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
  """(transformers model, our model loaded from its save_pretrained)."""
  hf = ref.tiny_model(seed=request.param, num_kv_heads=request.param)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  return hf, models.load_pretrained(path)


def test_full_features_logits_match_transformers(pair):
  hf, model = pair
  ids, mask = ref.video_prompts(PROMPT_LENGTHS, model.config.num_video_tokens)
  frames = ref.videos(len(PROMPT_LENGTHS))
  expected = ref.logits(hf, ids, mask, frames)
  got = np.asarray(model(jnp.asarray(ids), videos=jnp.asarray(frames),
                         attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


@torch.no_grad()
def _reference_patch_logits(hf, ids, frames):
  """transformers modules wired as the LanguageBind "patch" path (class token dropped)."""
  b, t = frames.shape[:2]
  pixels = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).flatten(0, 1)
  hidden = hf.model.video_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
  feats = hf.model.multi_modal_projector(hidden).reshape(b, -1, hf.config.text_config.hidden_size)
  ids = torch.from_numpy(ids)
  embeds = hf.model.get_input_embeddings()(ids)
  embeds[ids == ref.VIDEO_ID] = feats.flatten(0, 1)
  out = hf.model.language_model(inputs_embeds=embeds)
  return hf.lm_head(out.last_hidden_state).numpy()


def test_patch_features_logits_match_transformers_modules(pair):
  hf, model = pair
  cfg = dataclasses.replace(model.config, feature_strategy="patch")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.VideoLlava(cfg, rngs=nnx.Rngs(0))))
  patch_model = nnx.merge(graphdef, nnx.state(model))
  ids, _ = ref.video_prompts([6, 6], cfg.num_video_tokens)
  frames = ref.videos(2, seed=1)
  expected = _reference_patch_logits(hf, ids, frames)
  got = np.asarray(patch_model(jnp.asarray(ids), videos=jnp.asarray(frames)))
  assert cfg.num_video_tokens == ref.NUM_FRAMES * 4
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_tower_holds_only_layers_up_to_the_feature_layer(pair):
  hf, model = pair
  assert model.config.feature_layer == -2
  assert len(model.video_tower.layers) == hf.config.vision_config.num_hidden_layers - 1


def test_placeholder_count_mismatch_raises(pair):
  _, model = pair
  n = model.config.num_video_tokens
  ids, _ = ref.video_prompts([5, 5], n)
  ids[1, -1] = ref.VIDEO_ID
  feats = jnp.zeros((2, n, model.config.text.hidden_size))
  with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold \[%d\]" % (n + 1)):
    model.embed(jnp.asarray(ids), feats)


def _greedy(model, ids, mask, frames, steps, samples=None):
  """Left-padded prompts through the cache, then one token per step at a shared
  index: from `init_cache`, or from `prefill` for `samples` rows per prompt."""
  batch, prompt_len = ids.shape
  valid = np.zeros((batch, prompt_len + steps), bool)
  valid[:, :prompt_len] = mask
  x = model.embed(jnp.asarray(ids), model.encode_video(jnp.asarray(frames)))
  pos = jnp.asarray(ref.positions(mask))
  decode = nnx.jit(lambda m, x, p, v, c: m.decode(x, p, v, c))
  if samples is None:
    logits, cache = decode(model, x, pos, jnp.asarray(valid), model.init_cache(*valid.shape))
    logits = logits[:, -1]
  else:
    prefill = nnx.jit(lambda m, x, p, v: m.prefill(x, p, v, valid.shape[1], num_samples=samples))
    hidden, cache = prefill(model, x, pos, jnp.asarray(mask, bool))
    logits = jnp.repeat(model.logits(hidden), samples, axis=0)
    valid, pos = np.repeat(valid, samples, axis=0), jnp.repeat(pos, samples, axis=0)
  tokens = []
  for step in range(steps):
    token = jnp.argmax(logits, axis=-1)
    tokens.append(np.asarray(token))
    valid[:, prompt_len + step] = True
    pos = pos[:, -1:] + 1
    logits, cache = decode(model, model.embed(token[:, None]), pos, jnp.asarray(valid), cache)
    logits = logits[:, -1]
  return np.stack(tokens, axis=1)


def test_greedy_decoding_with_cache_matches_generate(pair):
  hf, model = pair
  ids, mask = ref.video_prompts(PROMPT_LENGTHS, model.config.num_video_tokens, seed=2)
  frames = ref.videos(len(PROMPT_LENGTHS), seed=2)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      pixel_values_videos=torch.from_numpy(frames).permute(0, 1, 4, 2, 3),
                      max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
  expected = out[:, ids.shape[1]:].numpy()
  assert expected.shape == (2, 16)
  np.testing.assert_array_equal(_greedy(model, ids, mask, frames, 16), expected)


def test_prefilled_cache_shared_by_samples_decodes_like_its_prompt(pair):
  _, model = pair
  ids, mask = ref.video_prompts(PROMPT_LENGTHS, model.config.num_video_tokens, seed=2)
  frames = ref.videos(len(PROMPT_LENGTHS), seed=2)
  alone = _greedy(model, ids, mask, frames, 8)
  shared = _greedy(model, ids, mask, frames, 8, samples=3)
  np.testing.assert_array_equal(shared, np.repeat(alone, 3, axis=0))
