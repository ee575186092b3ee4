"""Plain and packed rows against each response scored alone, unpadded.

The model here is a one-layer attention LM written for the test: it takes
position ids and a [N, L] padding mask (adding causality itself) or an
explicit [N, L, L] mask, like the project's decoder.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
from hypothesis import given, settings, strategies as st

from isr_dpo_jax import dpo, packing

VOCAB, WIDTH, MAX_POSITIONS = 13, 16, 64
PAIRS, PROMPT_LEN, RESPONSE_LEN = 2, 5, 4


@pytest.fixture(autouse=True, scope="module")
def exact_matmuls():
  """Full float32 matmuls: GPUs default to TF32, off by 1e-3 here."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def params():
  keys = iter(jax.random.split(jax.random.key(0), 8))
  normal = lambda *shape: 0.5 * jax.random.normal(next(keys), shape)
  return dict(embed=normal(VOCAB, WIDTH), position=normal(MAX_POSITIONS, WIDTH),
              query=normal(WIDTH, WIDTH), key=normal(WIDTH, WIDTH),
              value=normal(WIDTH, WIDTH), out=normal(WIDTH, WIDTH),
              head=normal(WIDTH, VOCAB))


def hidden_states(params, ids_NxL, positions_NxL, mask):
  x_NxLxD = params["embed"][ids_NxL] + params["position"][positions_NxL]
  if mask.ndim == 2:
    length = ids_NxL.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool)) & mask[:, None, :]
  scores_NxLxL = jnp.einsum("nqd,nkd->nqk", x_NxLxD @ params["query"],
                            x_NxLxD @ params["key"]) / np.sqrt(WIDTH)
  scores_NxLxL = jnp.where(mask, scores_NxLxL, jnp.finfo(jnp.float32).min)
  attended_NxLxD = jax.nn.softmax(scores_NxLxL) @ (x_NxLxD @ params["value"])
  return x_NxLxD + attended_NxLxD @ params["out"]


def response_logits(params, rows):
  hidden_NxTxD = packing.read_responses(
      hidden_states(params, rows.ids, rows.positions, rows.mask), rows)
  return hidden_NxTxD @ params["head"]


@jax.jit
def rows_logps(params, rows):
  return dpo.response_logps(response_logits(params, rows), rows.targets,
                            rows.target_mask)[0]


def lone_logps(params, prompt, response):
  """log p(response | prompt) from the unpadded sequence alone, in float64."""
  ids = np.concatenate([prompt, response])[None]
  logits = np.asarray(hidden_states(params, ids, np.arange(ids.shape[1])[None],
                                    np.ones(ids.shape, bool))[0]
                      @ params["head"], np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  predicting = np.arange(len(prompt) - 1, ids.shape[1] - 1)
  return log_probs[predicting, ids[0, predicting + 1]].sum()


def random_batch(rng, num_responses, prompt_lengths, response_lengths):
  """Left-padded prompts, right-padded responses; padding holds junk ids."""
  prompt_mask = np.arange(PROMPT_LEN) >= PROMPT_LEN - np.array(
      prompt_lengths)[:, None]
  response_mask = np.arange(RESPONSE_LEN) < np.array(
      response_lengths).reshape(num_responses, PAIRS, 1)
  return (rng.integers(1, VOCAB, (PAIRS, PROMPT_LEN)), prompt_mask,
          rng.integers(1, VOCAB, (num_responses, PAIRS, RESPONSE_LEN)),
          response_mask)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_plain_and_packed_equal_each_response_alone(params, data):
  num_responses = data.draw(st.integers(1, 3), label="responses")
  prompt_lengths = data.draw(
      st.lists(st.integers(1, PROMPT_LEN), min_size=PAIRS, max_size=PAIRS))
  response_lengths = data.draw(st.lists(
      st.integers(1, RESPONSE_LEN), min_size=num_responses * PAIRS,
      max_size=num_responses * PAIRS))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
  batch = random_batch(rng, num_responses, prompt_lengths, response_lengths)
  prompt_ids, prompt_mask, response_ids, response_mask = batch

  want = [lone_logps(params, prompt_ids[b][prompt_mask[b]],
                     response_ids[r, b][response_mask[r, b]])
          for r in range(num_responses) for b in range(PAIRS)]
  plain = rows_logps(params, packing.plain_rows(*batch))
  packed = rows_logps(params, packing.packed_rows(*batch))
  np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dpo_batch():
  rng = np.random.default_rng(3)
  prompt_ids, prompt_mask, response_ids, response_mask = random_batch(
      rng, 2, prompt_lengths=[2, 5], response_lengths=[4, 1, 2, 3])
  # The fields of data.batching.PreferenceBatch.
  return types.SimpleNamespace(
      prompt_ids=prompt_ids, prompt_mask=prompt_mask,
      chosen_ids=response_ids[0], chosen_mask=response_mask[0],
      rejected_ids=response_ids[1], rejected_mask=response_mask[1])


def test_packed_gradients_equal_plain(params, dpo_batch):
  ref_chosen, ref_rejected = np.random.default_rng(4).normal(-9, 1, (2, PAIRS))

  @functools.partial(jax.jit, static_argnames="packed")
  def objective_and_grad(params, packed):
    rows = packing.dpo_rows(dpo_batch, packed=packed)
    objective = lambda p: dpo.dpo_objective(
        response_logits(p, rows), rows.targets, rows.target_mask, ref_chosen,
        ref_rejected, np.ones(PAIRS, bool), num_pairs=PAIRS,
        num_chosen_tokens=dpo_batch.chosen_mask.sum(), beta=0.5, gamma=0.3)[0]
    return jax.value_and_grad(objective)(params)

  plain_loss, plain_grads = objective_and_grad(params, packed=False)
  packed_loss, packed_grads = objective_and_grad(params, packed=True)
  tolerance.assert_close(packed_loss, plain_loss)
  for name in params:
    assert np.abs(plain_grads[name]).max() > 0, name
    tolerance.assert_close(packed_grads[name], plain_grads[name], err_msg=name)


def test_packed_mask_keeps_responses_apart(dpo_batch):
  rows = packing.dpo_rows(dpo_batch, packed=True)
  prompt = slice(0, PROMPT_LEN)
  chosen = slice(PROMPT_LEN, PROMPT_LEN + RESPONSE_LEN)
  rejected = slice(PROMPT_LEN + RESPONSE_LEN, None)
  mask = np.asarray(rows.mask)
  assert not mask[:, rejected, chosen].any()
  assert not mask[:, chosen, rejected].any()
  assert not mask[:, prompt, PROMPT_LEN:].any()
  # Both responses see the prompt's real tokens, and positions restart.
  np.testing.assert_array_equal(mask[:, chosen, prompt].any(1),
                                dpo_batch.prompt_mask)
  np.testing.assert_array_equal(mask[:, rejected, prompt].any(1),
                                dpo_batch.prompt_mask)
  positions = np.asarray(rows.positions)
  np.testing.assert_array_equal(positions[:, chosen], positions[:, rejected])

