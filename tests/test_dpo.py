"""dpo.py against float64 NumPy re-implementations and torch's cross-entropy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
import torch

from isr_dpo_jax import dpo

BATCH = 32


def np_response_logps(logits, targets, mask):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  token = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  total = (token * mask).sum(-1)
  count = mask.sum(-1)
  return total, total / np.maximum(count, 1), count


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, lc, lr, *, beta=0.1, loss_type="sigmoid",
           label_smoothing=0.0, length_penalty=0.0, length_normalized=False):
  """docs/method.md §3, in float64."""
  if length_normalized or loss_type == "ipo":
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  logits = (pc - rc) - (pr - rr) - length_penalty * (lc - lr)
  if loss_type == "sigmoid":
    losses = (-np_log_sigmoid(beta * logits) * (1 - label_smoothing)
              - np_log_sigmoid(-beta * logits) * label_smoothing)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  else:
    losses = np.maximum(0.0, 1 - beta * logits)
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  metrics = {
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margins": chosen - rejected,
      "rewards/accuracies": chosen > rejected,
      "logps/chosen": pc,
      "logps/rejected": pr,
      "lengths/chosen": lc,
      "lengths/rejected": lr,
  }
  return losses, metrics


@pytest.fixture(scope="module")
def pair_logps():
  """Summed log-probs as a model gives them, policy near its reference."""
  rng = np.random.default_rng(0)
  lc = rng.integers(1, 60, BATCH).astype(np.float32)
  lr = rng.integers(1, 60, BATCH).astype(np.float32)
  rc = (-rng.uniform(0.5, 3.0, BATCH) * lc).astype(np.float32)
  rr = (-rng.uniform(0.5, 3.0, BATCH) * lr).astype(np.float32)
  pc = (rc + rng.normal(0, 10, BATCH)).astype(np.float32)
  pr = (rr + rng.normal(0, 10, BATCH)).astype(np.float32)
  return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2),
    dict(loss_type="sigmoid", length_penalty=0.05),
    dict(loss_type="sigmoid", length_normalized=True),
    dict(loss_type="ipo"),
    dict(loss_type="ipo", beta=0.5, length_penalty=0.02),
    dict(loss_type="hinge"),
    dict(loss_type="hinge", length_normalized=True, length_penalty=0.01),
], ids=str)
def test_dpo_loss_matches_numpy(pair_logps, options):
  pc, pr, rc, rr, lc, lr = pair_logps
  losses, metrics = jax.jit(functools.partial(dpo.dpo_loss, **options))(
      pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
  want_losses, want_metrics = np_dpo(
      *(x.astype(np.float64) for x in pair_logps), **options)
  assert metrics.keys() == want_metrics.keys()
  tolerance.assert_metrics_close(metrics | {"losses": losses},
                                 want_metrics | {"losses": want_losses})


def test_dpo_loss_inputs_exercise_both_sides(pair_logps):
  """The shared inputs reach both branches of hinge and of the accuracy."""
  losses, metrics = dpo.dpo_loss(*pair_logps[:4], chosen_lengths=pair_logps[4],
                                 rejected_lengths=pair_logps[5],
                                 loss_type="hinge")
  assert 0 < (losses == 0).mean() < 1
  assert 0 < metrics["rewards/accuracies"].mean() < 1


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_dpo_loss_is_finite_on_dummy_pairs(loss_type):
  """Pairs with no tokens (a short last batch's filler) give no NaN."""
  zeros = np.zeros(3, np.float32)
  losses, metrics = dpo.dpo_loss(zeros, zeros, zeros, zeros,
                                 chosen_lengths=zeros, rejected_lengths=zeros,
                                 loss_type=loss_type, length_normalized=True)
  assert np.isfinite(losses).all()
  assert all(np.isfinite(x).all() for x in metrics.values())


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="kto"), "loss_type"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
])
def test_dpo_loss_rejects_bad_options(pair_logps, options, message):
  with pytest.raises(ValueError, match=message):
    dpo.dpo_loss(*pair_logps[:4], chosen_lengths=pair_logps[4],
                 rejected_lengths=pair_logps[5], **options)


@pytest.fixture(scope="module")
def response_batch():
  """Logits far from zero (a naive exp overflows), an all-masked row."""
  rng = np.random.default_rng(1)
  logits = (rng.normal(0, 8, (4, 9, 50)) + 1000).astype(np.float32)
  targets = rng.integers(0, 50, (4, 9)).astype(np.int32)
  mask = rng.random((4, 9)) < 0.7
  mask[2] = False
  return logits, targets, mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_response_logps_matches_numpy(response_batch, dtype):
  logits, targets, mask = response_batch
  logits = jnp.asarray(logits, dtype)
  got = jax.jit(dpo.response_logps)(logits, targets, mask)
  # float32 arithmetic even on bf16 inputs: compare to the bf16 values.
  want = np_response_logps(np.asarray(logits.astype(jnp.float32)), targets,
                           mask)
  for name, g, w in zip(("sum", "mean", "count"), got, want):
    tolerance.assert_close(g, w, err_msg=name)
  assert got[0].dtype == jnp.float32 and got[2].dtype == jnp.int32


@pytest.mark.skipif(jax.default_backend() == "cpu",
                    reason="XLA:CPU keeps float32 copies of bf16 buffers")
def test_response_logps_backward_needs_no_vocab_sized_buffer():
  """Large vocab: the bf16 logits' gradient is one fused elementwise pass."""
  shape = (8, 64, 32000)
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(shape[:2], jnp.int32),
          jax.ShapeDtypeStruct(shape[:2], jnp.bool_)]
  grad = jax.grad(lambda *a: dpo.response_logps(*a)[0].sum())
  memory = jax.jit(grad).lower(*args).compile().memory_analysis()
  assert memory.temp_size_in_bytes < np.prod(shape) * 4 / 8


def test_sft_objective_matches_torch_cross_entropy(response_batch):
  logits, targets, mask = response_batch
  want = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).flatten(0, 1),
      torch.from_numpy(np.where(mask, targets, -100)).long().flatten(),
      ignore_index=-100)
  got, metrics = jax.jit(dpo.sft_objective)(logits, targets, mask,
                                            num_tokens=mask.sum())
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
  assert metrics == {"loss": got}


def _objective_batch(pairs=4, length=6, vocab=20):
  """Response logits, targets and masks [2, pairs, ...] (chosen, rejected),
  reference log-probs, and `real` pairs: the last one a dummy row (all
  masks False)."""
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 3, (2, pairs, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (2, pairs, length)).astype(np.int32)
  mask = np.arange(length) < rng.integers(1, length + 1, (2, pairs, 1))
  mask[:, -1] = False
  ref_chosen, ref_rejected = rng.normal(-20, 3, (2, pairs)).astype(np.float32)
  real = np.arange(pairs) < pairs - 1
  return logits, targets, mask, ref_chosen, ref_rejected, real


def _pairs(batch, index):
  """The pairs `index` of an `_objective_batch`."""
  logits, targets, mask, ref_chosen, ref_rejected, real = batch
  return (logits[:, index], targets[:, index], mask[:, index],
          ref_chosen[index], ref_rejected[index], real[index])


def _objective_args(logits, targets, mask, ref_chosen, ref_rejected, real):
  """dpo_objective's arguments: chosen rows, then rejected rows."""
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  return (flat(logits), flat(targets), flat(mask), ref_chosen, ref_rejected,
          real)


@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid", beta=0.1, dpo_alpha=0.7, gamma=0.3),
    dict(loss_type="ipo", beta=0.5, dpo_alpha=1.0, gamma=0.0),
    dict(loss_type="hinge", length_normalized=True, gamma=1.0),
], ids=str)
def test_dpo_objective_combines_dpo_and_sft_over_real_pairs(options):
  """The last pair is a dummy row (all masks False): it must count nowhere."""
  batch = _objective_batch()
  logits, targets, mask, ref_chosen, ref_rejected, real = batch
  pairs = real.size

  objective = functools.partial(
      dpo.dpo_objective, num_pairs=real.sum(),
      num_chosen_tokens=mask[0].sum(), **options)
  args = _objective_args(*batch)
  (total, metrics), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      *args)
  grad = grad.reshape(logits.shape)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[:, -1], 0.0)

  dpo_alpha, gamma = options.pop("dpo_alpha", 1.0), options.pop("gamma")
  kept = slice(0, pairs - 1)
  (sc, _, lc), (sr, _, lr) = (np_response_logps(logits[i, kept],
                                                targets[i, kept], mask[i, kept])
                              for i in (0, 1))
  losses, want_metrics = np_dpo(sc, sr, ref_chosen[kept], ref_rejected[kept],
                                lc, lr, **options)
  sft = -sc.sum() / lc.sum()
  want_total = dpo_alpha * losses.mean() + gamma * sft
  want_metrics = {name: x.mean() for name, x in want_metrics.items()}
  want_metrics |= {"losses/dpo": losses.mean(), "losses/sft": sft,
                   "loss": want_total}
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  assert metrics.keys() == want_metrics.keys()
  tolerance.assert_metrics_close(metrics, want_metrics)


def test_microbatch_shares_add_up_to_the_objective():
  """Each half of a batch, with the whole batch's counts, gives its share:
  the shares (and their gradients) add up to the whole batch's objective."""
  batch = _objective_batch(pairs=6)
  logits, targets, mask, *_, real = batch
  counts = dict(num_pairs=real.sum(), num_chosen_tokens=mask[0].sum())
  dpo_fn = jax.jit(jax.value_and_grad(
      functools.partial(dpo.dpo_objective, beta=0.5, gamma=0.3, **counts),
      has_aux=True))
  sft_fn = jax.jit(functools.partial(dpo.sft_objective,
                                     num_tokens=mask[0].sum()))
  halves = [_pairs(batch, slice(0, 3)), _pairs(batch, slice(3, 6))]
  (whole, whole_metrics), whole_grad = dpo_fn(*_objective_args(*batch))
  shares = [dpo_fn(*_objective_args(*half)) for half in halves]
  tolerance.assert_metrics_close(
      jax.tree.map(lambda a, b: a + b, shares[0][0][1], shares[1][0][1]),
      whole_metrics)
  tolerance.assert_close(shares[0][0][0] + shares[1][0][0], whole)
  # Gradients: a half's logits get the whole batch's gradient there.
  for h, (_, grad) in enumerate(shares):
    tolerance.assert_close(
        grad.reshape(2, 3, *logits.shape[2:]),
        whole_grad.reshape(logits.shape)[:, 3 * h:3 * h + 3],
        scale=np.abs(whole_grad).max())

  chosen = lambda x: x[0]
  sft_whole, _ = sft_fn(*map(chosen, (logits, targets, mask)))
  sft_shares = [sft_fn(*map(chosen, half[:3]))[0] for half in halves]
  tolerance.assert_close(sum(sft_shares), sft_whole)
