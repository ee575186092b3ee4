"""Model rows for responses to a shared prompt: one row each, or one packed row.

Input (as in `data/batching.py`; a DPO batch stacks chosen and rejected as
R = 2 responses): prompt_ids [B, P] left-padded, response_ids [R, B, T]
right-padded, each with a boolean mask.

- Plain: a row [prompt ; response] per response, response-major (all chosen
  rows, then all rejected rows): R*B rows of length P + T, with a [R*B, L]
  padding mask to which the model adds causality.
- Packed: one row [prompt ; response_0 ; ... ; response_R-1] per prompt: B
  rows of length P + R*T, with a [B, L, L] boolean attention mask: the prompt
  attends causally to itself, each response causally to the prompt and to
  itself, never to another response. Every response's positions restart right
  after the prompt, as if it were alone. The model sees exactly what it sees
  in the plain rows, but runs the long (video) prompt once.

The next-token shift lives here and nowhere else: a model output at row
position i predicts the token at i + 1. `Rows.readout` names, for every
response token, the row position whose output predicts it. The first token of
EVERY response is predicted from the last prompt position P - 1 (left padding
puts the prompt's last token there), so in a packed row that one output
serves all responses; later tokens from the token before them in the same
response.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from isr_dpo_jax import parallel


class Rows(NamedTuple):
  """Model inputs for R responses per prompt, and where their predictions are.

  Attributes:
    ids: [N, L] int32 tokens.
    positions: [N, L] int32 position ids.
    mask: [N, L] padding mask (plain) or [N, L, L] attention mask (packed).
    readout: [K] int32 row positions whose outputs predict the response
      tokens: K = T (plain) or R*T (packed, response after response).
    targets: [R*B, T] int32 response tokens, response-major.
    target_mask: [R*B, T] bool, the response tokens that count.
  """
  ids: jax.Array
  positions: jax.Array
  mask: jax.Array
  readout: jax.Array
  targets: jax.Array
  target_mask: jax.Array


def plain_rows(prompt_ids_BxP, prompt_mask_BxP, response_ids_RxBxT,
               response_mask_RxBxT):
  """One row [prompt ; response] per response, response-major."""
  num_responses, _, length_t = response_ids_RxBxT.shape
  length_p = prompt_ids_BxP.shape[1]
  targets_NxT = _response_major(response_ids_RxBxT)
  target_mask_NxT = _response_major(response_mask_RxBxT)
  prompt_positions_BxP, response_positions_BxT = _positions(prompt_mask_BxP,
                                                            length_t)
  return Rows(
      ids=jnp.concatenate(
          [jnp.tile(prompt_ids_BxP, (num_responses, 1)), targets_NxT], axis=1),
      positions=jnp.tile(
          jnp.concatenate([prompt_positions_BxP, response_positions_BxT],
                          axis=1), (num_responses, 1)),
      mask=jnp.concatenate(
          [jnp.tile(prompt_mask_BxP, (num_responses, 1)), target_mask_NxT],
          axis=1),
      readout=jnp.arange(length_p - 1, length_p - 1 + length_t),
      targets=targets_NxT,
      target_mask=target_mask_NxT)


def packed_rows(prompt_ids_BxP, prompt_mask_BxP, response_ids_RxBxT,
                response_mask_RxBxT):
  """One row [prompt ; response_0 ; ... ; response_R-1] per prompt."""
  num_responses, _, length_t = response_ids_RxBxT.shape
  length_p = prompt_ids_BxP.shape[1]
  prompt_positions_BxP, response_positions_BxT = _positions(prompt_mask_BxP,
                                                            length_t)
  valid_BxL = jnp.concatenate(
      [prompt_mask_BxP, _side_by_side(response_mask_RxBxT)], axis=1)
  visible_LxL = _block_causal(length_p, length_t, num_responses)
  return Rows(
      ids=jnp.concatenate(
          [prompt_ids_BxP, _side_by_side(response_ids_RxBxT)], axis=1),
      positions=jnp.concatenate(
          [prompt_positions_BxP] + [response_positions_BxT] * num_responses,
          axis=1),
      mask=visible_LxL & valid_BxL[:, None, :],
      readout=jnp.asarray(
          _packed_readout(length_p, length_t, num_responses)),
      targets=_response_major(response_ids_RxBxT),
      target_mask=_response_major(response_mask_RxBxT))


def dpo_rows(batch, *, packed: bool) -> Rows:
  """Rows for a `data.batching.PreferenceBatch`: chosen first, then rejected."""
  response_ids_2xBxT = jnp.stack([batch.chosen_ids, batch.rejected_ids])
  response_mask_2xBxT = jnp.stack([batch.chosen_mask, batch.rejected_mask])
  build = packed_rows if packed else plain_rows
  return build(batch.prompt_ids, batch.prompt_mask, response_ids_2xBxT,
               response_mask_2xBxT)


def read_responses(x_NxLxD, rows: Rows):
  """Picks the outputs that predict the response tokens: [R*B, T, ...].

  `x` is any per-position model output: logits, or better the final hidden
  states, so that the LM head (and its [., ., V] logits) runs on response
  tokens only and never on the long prompt.
  """
  num_rows, _, *features = x_NxLxD.shape
  length_t = rows.targets.shape[1]
  # Rows stay on the batch axes through the gather: else its backward pass
  # (a scatter-add) ran on every row on each chip, for a 7B micro-batch of
  # 16 packed rows two [16, 5128, 4096] buffers (641 MiB each) a chip.
  x_NxRxTxD = parallel.shard_rows(x_NxLxD[:, rows.readout]).reshape(
      num_rows, -1, length_t, *features)
  return x_NxRxTxD.swapaxes(0, 1).reshape(-1, length_t, *features)


def _positions(prompt_mask_BxP, length_t):
  """Prompt positions count its real tokens; responses continue from there."""
  prompt_positions_BxP = jnp.maximum(
      jnp.cumsum(prompt_mask_BxP, axis=1, dtype=jnp.int32) - 1, 0)
  prompt_lengths_Bx1 = prompt_mask_BxP.sum(axis=1, keepdims=True,
                                           dtype=jnp.int32)
  return prompt_positions_BxP, prompt_lengths_Bx1 + jnp.arange(length_t)


def _response_major(x_RxBxT):
  return x_RxBxT.reshape(-1, x_RxBxT.shape[-1])


def _side_by_side(x_RxBxT):
  num_responses, batch, length_t = x_RxBxT.shape
  return x_RxBxT.swapaxes(0, 1).reshape(batch, num_responses * length_t)


def _block_causal(length_p, length_t, num_responses):
  """[L, L] static visibility: causal, and no response sees another."""
  segment_L = np.repeat(np.arange(num_responses + 1),
                        [length_p] + [length_t] * num_responses)
  index_L = np.arange(segment_L.size)
  causal_LxL = index_L[:, None] >= index_L[None, :]
  visible_LxL = ((segment_L[None, :] == 0)
                 | (segment_L[:, None] == segment_L[None, :]))
  return causal_LxL & visible_LxL


def _packed_readout(length_p, length_t, num_responses):
  """Per response: the last prompt position, then its own tokens but last."""
  starts_R = length_p + length_t * np.arange(num_responses)
  readout_RxT = np.concatenate(
      [np.full((num_responses, 1), length_p - 1),
       starts_R[:, None] + np.arange(length_t - 1)], axis=1)
  return readout_RxT.reshape(-1).astype(np.int32)
