"""The LLaMA decoder against transformers: rotary scaling, tied head, explicit masks."""
import conftest
import hf_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from isr_dpo_jax import models
from isr_dpo_jax import plan
from isr_dpo_jax.models import config as config_lib
from isr_dpo_jax.models import layers
from isr_dpo_jax.models import llama
from isr_dpo_jax.models.llama import rope_inverse_frequencies

ROPE = {
    "default": {},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # Wavelengths of a 32-dim head span all three llama3 bands for a 64-token context.
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_rope_inverse_frequencies_match_transformers(rope_type):
  hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2,
                                       rope_parameters=dict(ROPE[rope_type]))
  expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
  ours = rope_inverse_frequencies(config_lib.llama_from_dict(hf_config.to_dict()))
  tolerance.assert_close(ours, expected.numpy())


@pytest.fixture(scope="module", params=["default", "linear", "llama3", "tied"])
def pair(request, tmp_path_factory):
  text = {"rope_parameters": dict(ROPE[request.param])} if request.param in ROPE else {}
  hf = ref.tiny_model(seed=3, text=text, tie_word_embeddings=request.param == "tied")
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return hf, models.load_pretrained(path)


def test_text_logits_at_far_positions_match_transformers(pair):
  hf, model = pair
  ids = np.random.default_rng(0).integers(3, ref.IMAGE_ID, (2, 12))
  positions = 100 + np.arange(12)[None].repeat(2, axis=0)  # Beyond llama3's 64.
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(ids),
                  position_ids=torch.from_numpy(positions)).logits.numpy()
  got, _ = model.decode(model.embed(jnp.asarray(ids)), jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_tied_head_shares_the_embedding(pair):
  hf, model = pair
  assert (model.language_model.lm_head is None) == hf.config.tie_word_embeddings


def test_packed_row_with_block_mask_equals_separate_rows(pair):
  """[prefix | chosen | rejected] in one row, as the DPO trainer packs them."""
  _, model = pair
  rng = np.random.default_rng(1)
  prefix, chosen, rejected = (rng.integers(3, ref.IMAGE_ID, n) for n in (5, 4, 3))
  p, c, r = len(prefix), len(chosen), len(rejected)
  packed = np.concatenate([prefix, chosen, rejected])[None]
  positions = np.concatenate([np.arange(p + c), p + np.arange(r)])[None]
  segment = np.array([0] * p + [1] * c + [2] * r)
  causal = np.tril(np.ones((p + c + r,) * 2, bool))
  visible = (segment[:, None] == segment[None]) | (segment[None] == 0)
  logits, _ = model.decode(model.embed(jnp.asarray(packed)), jnp.asarray(positions),
                           jnp.asarray((causal & visible)[None]))
  for response, start in ((chosen, p), (rejected, p + c)):
    row = np.concatenate([prefix, response])[None]
    alone, _ = model.decode(model.embed(jnp.asarray(row)), jnp.arange(row.shape[1])[None])
    tolerance.assert_close(logits[0, start:start + len(response)], alone[0, p:])
    tolerance.assert_close(logits[0, :p], alone[0, :p])


def _attention_grads(mask):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 37, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 8)), jnp.float32) for _ in "kv")
  loss = lambda q, k, v: (layers.attention(q, k, v, mask) ** 2).sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("mask", ["packed", "causal", None])
def test_attention_in_query_blocks_equals_one_pass(mask, monkeypatch):
  """37 queries in blocks of 8 (the last one padded): values and gradients."""
  rng = np.random.default_rng(1)
  masks = {"packed": jnp.asarray(rng.random((2, 37, 37)) < 0.6) | jnp.eye(37, dtype=bool),
           "causal": jnp.tril(jnp.ones((1, 37, 37), bool)), None: None}
  want = _attention_grads(masks[mask])
  monkeypatch.setattr(layers, "QUERY_BLOCK", 8)
  got = _attention_grads(masks[mask])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    tolerance.assert_close(g, w)


def test_long_attention_backward_holds_less_than_its_logits():
  """4096 queries x 4096 keys x 4 heads: the float32 logits are 256 MiB; the
  gradient's temporaries stay below one such copy (blocks of 512 queries)."""
  q = jax.ShapeDtypeStruct((1, 4096, 4, 32), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((1, 4096, 4096), bool)
  grad = jax.grad(lambda q, k, v, mask: layers.attention(q, k, v, mask).astype(
      jnp.float32).sum(), argnums=(0, 1, 2))
  memory = jax.jit(grad).lower(q, q, q, mask).compile().memory_analysis()
  assert memory.temp_size_in_bytes < 4 * 4096 * 4096 * 4


def test_prefill_hidden_state_gives_transformers_logits_after_each_prompt(pair):
  """Left-padded prompts in query blocks, the last layer at the last position
  alone: the output head on prefill's [B, D] is transformers' last logits."""
  hf, model = pair
  text = model.language_model
  ids = np.random.default_rng(4).integers(3, ref.IMAGE_ID, (3, 9))
  mask = np.ones_like(ids, bool)
  mask[1, :4] = mask[2, :1] = False
  hidden_BxD, _ = text.prefill(text.embed(jnp.asarray(ids)), jnp.asarray(ref.positions(mask)),
                               jnp.asarray(mask), max_len=12)
  want = ref.logits(hf, ids, mask.astype(np.int64))[:, -1]
  tolerance.assert_close(text.logits(hidden_BxD), want)


def test_many_tokens_on_a_cache_attend_in_blocks_as_transformers_does(pair, monkeypatch):
  """Two 11-token suffixes of one prefilled prompt (a judge's two orders) in
  blocks of 4 queries, the last padded: the whole rows' logits in transformers,
  and with last_only (a judge's scoring) the last position's."""
  hf, model = pair
  monkeypatch.setattr(llama, "CACHED_QUERY_BLOCK", 4)
  text = model.language_model
  rng = np.random.default_rng(2)
  prompt = rng.integers(3, ref.IMAGE_ID, (1, 6))
  suffixes = rng.integers(3, ref.IMAGE_ID, (2, 11))
  suffix_mask = np.ones_like(suffixes, bool)
  suffix_mask[1, :3] = False  # the second order is shorter: left-padded
  _, cache = text.prefill(text.embed(jnp.asarray(prompt)), jnp.arange(6)[None],
                          jnp.ones((1, 6), bool), max_len=6 + 11, num_samples=2)
  valid_NxS = np.concatenate([np.ones((2, 6), bool), suffix_mask], axis=1)
  positions_NxM = 6 + np.cumsum(suffix_mask, axis=1) - 1
  got, _ = text(text.embed(jnp.asarray(suffixes)), jnp.asarray(positions_NxM),
                jnp.asarray(valid_NxS), cache)
  whole = np.concatenate([prompt.repeat(2, axis=0), suffixes], axis=1)
  want = ref.logits(hf, whole, valid_NxS.astype(np.int64))
  for row in range(2):
    real = suffix_mask[row]
    tolerance.assert_close(got[row][real], want[row, 6:][real])
  last_Nx1xD, _ = text.hidden_states(text.embed(jnp.asarray(suffixes)),
                                     jnp.asarray(positions_NxM), jnp.asarray(valid_NxS),
                                     cache, last_only=True)
  tolerance.assert_close(text.logits(last_Nx1xD[:, 0]), want[:, -1])
  with pytest.raises(ValueError, match="needs a cache"):
    text.hidden_states(text.embed(jnp.asarray(suffixes)), jnp.asarray(positions_NxM),
                       last_only=True)


@conftest.needs_libtpu
def test_a_long_suffix_on_a_cache_holds_less_than_a_blocks_logits_on_tpu():
  """4 suffixes of 1,024 tokens over a 2,048-token prefix and their own keys,
  compiled for a v5e chip: the temporaries stay below half of one query
  block's float32 logits. With the prefix's and the own keys' logits
  concatenated they were a whole block's (96 MiB here): XLA:TPU kept the
  copies that XLA:CPU fuses away."""
  device = plan.target("v5e:1x1").devices[0]
  rows, heads, head_dim, prefix_len, own = 4, 16, 128, 2048, 1024
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
      s, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
  q = shape(rows, own, heads, head_dim)
  k = shape(rows, heads, own, head_dim)
  prefix = (shape(2, heads, head_dim, prefix_len), shape(2, heads, prefix_len, head_dim))
  mask = shape(rows, own, prefix_len + own, dtype=bool)
  attend = lambda q, k, v, mask, prefix: layers.in_query_blocks(
      lambda q, m: llama.attention(q, k, v, m, prefix=prefix), q, mask,
      llama.CACHED_QUERY_BLOCK)
  memory = jax.jit(attend).lower(q, k, k, mask, prefix).compile().memory_analysis()
  block_logits = rows * heads * llama.CACHED_QUERY_BLOCK * (prefix_len + own) * 4
  assert memory.temp_size_in_bytes < block_logits / 2
