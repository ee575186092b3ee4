"""Sampling filters and draws against NumPy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance

from isr_dpo_jax import sampling


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_filtered_probs(logits, temperature, top_k, top_p):
  """Hugging Face's warper semantics written from their definitions (float64)."""
  logits = logits.astype(np.float64) / temperature
  keep = np.ones_like(logits, bool)
  for row, kept in zip(logits, keep):
    order = np.argsort(-row)
    if top_k:
      kept[order[top_k:]] = False
    probs = _np_softmax(np.where(kept, row, -np.inf))[order]
    mass_before = np.cumsum(probs) - probs
    kept[order[mass_before >= top_p]] = False
  return _np_softmax(np.where(keep, logits, -np.inf))


def _logits(batch=6, vocab=300, seed=0):
  rng = np.random.default_rng(seed)
  # Rows from flat to peaked, so top-p keeps anything from one token to most.
  scale = np.geomspace(0.1, 20, batch)[:, None]
  return (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.9),
    (0.7, 0, 0.5), (1.3, 50, 0.95), (1.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_filter_logits_keeps_what_the_definitions_keep(temperature, top_k,
                                                       top_p):
  logits = _logits()
  got = sampling.filter_logits(jnp.asarray(logits), temperature=temperature,
                               top_k=top_k, top_p=top_p)
  want = np_filtered_probs(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), want > 0)
  tolerance.assert_close(jax.nn.softmax(got), want)


def test_top_p_cutoff_handles_negative_and_huge_logits():
  logits = np.array([[-1e30, -3.0, -2.5, -2.0, 1e-30, 4.0, 4.0 + 1e-6]],
                    np.float32)
  got = sampling.filter_logits(jnp.asarray(logits), top_p=0.999)
  want = np_filtered_probs(logits, 1.0, 0, 0.999)
  np.testing.assert_array_equal(np.isfinite(got), want > 0)


def _assert_draws_follow(tokens_DxB, want_BxV):
  """Each row's draws hit no zero-probability token and lie within about
  twice the total-variation distance expected of that many exact draws."""
  draws = len(tokens_DxB)
  for tokens, want in zip(tokens_DxB.T, want_BxV):
    empirical = np.bincount(tokens, minlength=len(want)) / draws
    assert np.all(empirical[want == 0] == 0)
    expected_tv = 0.5 * np.sqrt(2 * want * (1 - want) / (np.pi * draws)).sum()
    assert 0.5 * np.abs(empirical - want).sum() < 2 * expected_tv + 0.002


@pytest.mark.parametrize("vocab", [40, 300])
def test_categorical_matches_softmax_and_never_draws_filtered_tokens(vocab):
  logits = _logits(batch=3, vocab=vocab, seed=1)
  logits[:, ::3] = -np.inf
  logits[1, 128:256] = -np.inf  # a whole block of the inversion (vocab 300)
  draws = 60_000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = jax.jit(jax.vmap(sampling.categorical, in_axes=(0, None)))(
      keys[:, None], jnp.asarray(logits))  # [draws, 3]
  _assert_draws_follow(np.asarray(tokens), _np_softmax(logits.astype(np.float64)))


@pytest.mark.parametrize("top_p,rounds", [(0.9, 4), (0.3, 4), (0.3, 1)])
def test_nucleus_draws_follow_the_filtered_distribution(top_p, rounds):
  # rounds=1 sends every rejected draw to the bisected nucleus; at top_p 0.3
  # a flat row is rejected about 70% of the time, so both paths are drawn.
  logits = _logits(batch=4, vocab=300, seed=2)
  draws = 60_000
  keys = jax.random.split(jax.random.key(1), draws)
  nucleus = functools.partial(sampling._nucleus, top_p=top_p, rounds=rounds)
  tokens = jax.jit(jax.vmap(nucleus, in_axes=(0, None)))(
      keys[:, None], jnp.asarray(logits))
  _assert_draws_follow(np.asarray(tokens), np_filtered_probs(logits, 1.0, 0, top_p))


def test_greedy_is_argmax_and_ignores_keys():
  logits = _logits()
  keys = jax.random.split(jax.random.key(3), len(logits))
  got = sampling.next_tokens(jnp.asarray(logits), keys,
                             sampling.SamplingParams(temperature=0))
  np.testing.assert_array_equal(got, logits.argmax(-1))


def test_next_tokens_depend_only_on_each_rows_key():
  logits = jnp.asarray(_logits(batch=4))
  keys = jax.random.split(jax.random.key(4), 4)
  params = sampling.SamplingParams(temperature=1.0, top_p=0.9)
  full = sampling.next_tokens(logits, keys, params)
  alone = [sampling.next_tokens(logits[i:i + 1], keys[i:i + 1], params)[0]
           for i in range(4)]
  np.testing.assert_array_equal(full, alone)


def test_token_logprobs_are_the_untempered_log_softmax():
  logits = _logits()
  tokens = np.arange(len(logits)) * 7
  got = sampling.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  tolerance.assert_close(got, log_softmax[np.arange(len(logits)), tokens])


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
    dict(max_new_tokens=0)])
def test_sampling_params_reject_bad_values(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    sampling.SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_ids_are_never_produced(temperature):
  logits = jnp.tile(jnp.array([0.0, 9.0, 8.0, 1.0]), (64, 1))  # 1 is the favourite
  params = sampling.SamplingParams(temperature=temperature, banned_ids=(1,))
  keys = jax.random.split(jax.random.key(0), 64)
  tokens = np.asarray(sampling.next_tokens(logits, keys, params))
  assert not (tokens == 1).any()
  assert (tokens == 2).mean() > 0.9  # the best allowed token takes its place
