"""DPO and SFT objectives on response log-probs (docs/method.md §3).

Pure functions, no model. Their logits are already aligned with the tokens
they score: `logits_BxTxV[:, t]` scores `targets_BxT[:, t]`. `packing.py` owns
the next-token shift that picks those logits out of a model's rows.

Sequence log-probs travel as SUMS over response tokens, with the response
lengths beside them (this is also how reference log-probs are stored with the
pairs); `dpo_loss` turns them into per-token means where the loss asks for it,
so no caller has to know which aggregation a loss type wants.

`dpo_loss` works pair by pair (losses and metrics [B]) and stays finite on
the dummy pairs that fill a short last batch (`data/batching.py`, all tokens
masked). The objectives, `dpo_objective` and `sft_objective`, are what
training differentiates (train.py runs the model, they do the rest): each
returns a batch's SHARE of a larger batch's objective, its means taken over
the real pairs and tokens of the whole batch, so that the shares of the
microbatches of a gradient-accumulated batch add up to the exact objective.
"""
from typing import Literal

import jax
import jax.numpy as jnp

from isr_dpo_jax.settings import LOSS_TYPES

LossType = Literal[LOSS_TYPES]


def response_logps(logits_BxTxV, targets_BxT, mask_BxT):
  """Log-probs of the masked response tokens: (sum_B, mean_B, count_B).

  The target logit minus logsumexp, in float32 whatever the logits dtype.
  The target logit is picked by a masked sum over the vocabulary, not a
  gather: a gather's gradient is a scatter into a dense float32 [B, T, V]
  buffer, while this one fuses into the elementwise softmax gradient (on an
  H200, bf16 [8, 256, 32000] logits: backward temporaries 0 instead of
  250 MiB, 1.5x faster; no float32 copy of the logits in the forward).
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  is_target_BxTxV = (jnp.arange(logits_BxTxV.shape[-1])
                     == targets_BxT[..., None])
  target_logits_BxT = jnp.where(is_target_BxTxV, logits_BxTxV, 0.0).sum(-1)
  token_logps_BxT = target_logits_BxT - jax.nn.logsumexp(logits_BxTxV, -1)
  token_logps_BxT = jnp.where(mask_BxT, token_logps_BxT, 0.0)
  sum_B = token_logps_BxT.sum(axis=-1)
  count_B = mask_BxT.sum(axis=-1, dtype=jnp.int32)
  mean_B = sum_B / jnp.maximum(count_B, 1)
  return sum_B, mean_B, count_B


def dpo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps, *,
             chosen_lengths, rejected_lengths, beta=0.1,
             loss_type: LossType = "sigmoid", label_smoothing=0.0,
             length_penalty=0.0, length_normalized=False):
  """Per-pair DPO losses and metrics, [B] each.

  Args:
    policy_chosen_logps: [B] summed log-probs of y_w under the policy.
    policy_rejected_logps: [B] summed log-probs of y_l under the policy.
    reference_chosen_logps: [B] summed log-probs of y_w under the reference.
    reference_rejected_logps: [B] summed log-probs of y_l under the reference.
    chosen_lengths: [B] token counts |y_w|.
    rejected_lengths: [B] token counts |y_l|.
    beta: the KL strength (tau of IPO).
    loss_type: "sigmoid" (DPO, with cDPO label smoothing), "ipo" (always on
      per-token mean log-probs, as in the lineage's trainer) or "hinge"
      (SLiC).
    label_smoothing: eps, the assumed share of flipped labels; sigmoid only.
    length_penalty: alpha of R-DPO, in nats per token of length difference:
      logits - alpha * (|y_w| - |y_l|). (R-DPO's paper writes it after the
      beta scaling; its alpha is beta * this one.)
    length_normalized: score responses by per-token mean log-probs.

  Returns:
    (losses_B, metrics_B): rewards/{chosen,rejected,margins,accuracies},
    logps/{chosen,rejected} (as the loss saw them) and lengths/{chosen,
    rejected}, without gradient.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
  if label_smoothing and loss_type != "sigmoid":
    raise ValueError(f"label_smoothing applies to the sigmoid loss only, not "
                     f"to {loss_type!r}")
  chosen_lengths = jnp.asarray(chosen_lengths, jnp.float32)
  rejected_lengths = jnp.asarray(rejected_lengths, jnp.float32)
  if length_normalized or loss_type == "ipo":
    chosen_divisor = jnp.maximum(chosen_lengths, 1)
    rejected_divisor = jnp.maximum(rejected_lengths, 1)
    policy_chosen_logps = policy_chosen_logps / chosen_divisor
    reference_chosen_logps = reference_chosen_logps / chosen_divisor
    policy_rejected_logps = policy_rejected_logps / rejected_divisor
    reference_rejected_logps = reference_rejected_logps / rejected_divisor

  chosen_logratios = policy_chosen_logps - reference_chosen_logps
  rejected_logratios = policy_rejected_logps - reference_rejected_logps
  logits = (chosen_logratios - rejected_logratios
            - length_penalty * (chosen_lengths - rejected_lengths))
  if loss_type == "sigmoid":
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  else:
    losses = jax.nn.relu(1 - beta * logits)

  chosen_rewards = beta * chosen_logratios
  rejected_rewards = beta * rejected_logratios
  metrics_B = {
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/margins": chosen_rewards - rejected_rewards,
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(
          jnp.float32),
      "logps/chosen": policy_chosen_logps,
      "logps/rejected": policy_rejected_logps,
      "lengths/chosen": chosen_lengths,
      "lengths/rejected": rejected_lengths,
  }
  return losses, jax.lax.stop_gradient(metrics_B)


def dpo_objective(logits_2BxTxV, targets_2BxT, mask_2BxT,
                  reference_chosen_B, reference_rejected_B, real_B, *,
                  num_pairs, num_chosen_tokens, dpo_alpha=1.0, gamma=0.0,
                  **loss_options):
  """This batch's share of dpo_alpha * mean(L_dpo) + gamma * CE(chosen).

  Runs on the policy's response logits only (see `packing.read_responses`);
  reference log-probs come precomputed, as stored with the pairs. The mean
  of L_dpo (and of each metric) is over the `num_pairs` real pairs of the
  whole batch, the cross-entropy a token mean over its `num_chosen_tokens`
  chosen tokens: so the shares of a batch's microbatches add up to the
  exact objective of the batch (on a whole batch, pass its own counts).

  Args:
    logits_2BxTxV: policy logits scoring the responses, chosen rows first
      (`packing.read_responses` returns them in this layout).
    targets_2BxT: response tokens, chosen rows then rejected rows.
    mask_2BxT: the response tokens that count.
    reference_chosen_B: summed reference log-probs of y_w.
    reference_rejected_B: summed reference log-probs of y_l.
    real_B: the pairs that count; dummy pairs (False) count for nothing.
    num_pairs: real pairs in the whole batch (at least 1).
    num_chosen_tokens: chosen tokens in the whole batch (at least 1).
    dpo_alpha: weight of the DPO term.
    gamma: weight of the SFT cross-entropy on the chosen responses.
    **loss_options: `dpo_loss` options (beta, loss_type, ...).

  Returns:
    (loss, metrics): `dpo_loss`'s metrics as shares of their means, "loss"
    and losses/{dpo, sft}, each of these two before its weight.
  """
  sum_2B, _, count_2B = response_logps(logits_2BxTxV, targets_2BxT, mask_2BxT)
  chosen_logps_B, rejected_logps_B = jnp.split(sum_2B, 2)
  chosen_lengths_B, rejected_lengths_B = jnp.split(count_2B, 2)
  losses_B, metrics_B = dpo_loss(
      chosen_logps_B, rejected_logps_B, reference_chosen_B,
      reference_rejected_B, chosen_lengths=chosen_lengths_B,
      rejected_lengths=rejected_lengths_B, **loss_options)
  share = lambda x_B: jnp.where(real_B, x_B, 0).sum() / num_pairs
  dpo_term = share(losses_B)
  sft_term = -chosen_logps_B.sum() / num_chosen_tokens
  total = dpo_alpha * dpo_term + gamma * sft_term
  metrics = {name: share(x_B) for name, x_B in metrics_B.items()}
  return total, metrics | {"loss": total, "losses/dpo": dpo_term,
                           "losses/sft": sft_term}


def sft_objective(logits_BxTxV, targets_BxT, mask_BxT, *, num_tokens):
  """This batch's share of the token-mean cross-entropy of a larger batch.

  The masked tokens' negative log-likelihood summed, over the `num_tokens`
  masked tokens of the whole batch (at least 1), so that microbatch shares
  add up. Token-weighted like torch's CrossEntropyLoss(ignore_index=-100),
  which the lineage's trainer uses for its SFT term. Returns (loss, metrics).
  """
  sum_B, _, _ = response_logps(logits_BxTxV, targets_BxT, mask_BxT)
  loss = -sum_B.sum() / num_tokens
  return loss, {"loss": loss}
