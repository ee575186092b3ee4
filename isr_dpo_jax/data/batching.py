"""Padded, bucketed batches: the contract between data and the model code.

Conventions (as in Tunix's DPO input):
  * prompts are LEFT-padded, so every prompt ends at the same column and
    generation or the response continues right after it;
  * responses (and SFT targets) are RIGHT-padded and include the eos;
  * masks are bool, True on real tokens;
  * lengths are rounded up to a few bucket sizes, so a stage compiles a
    handful of programs; prompts bucket as `offset + bucket`, the offset
    being the number of video tokens, so the text part drives the buckets;
  * the batch size is fixed: a short last batch is filled with dummy rows
    whose masks are all False (`is_real` tells them apart). Code that attends
    over a dummy row must use a finite mask value, so that no NaN appears.

Positions count real tokens only: `positions(mask)` over the concatenation
[prompt, response] gives 0 at the first real prompt token.
"""
from collections.abc import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from isr_dpo_jax.data import tokenize
from isr_dpo_jax.settings import BUCKETS  # config.sampling.buckets' default


class _Rows:
  """Every batch has a prompt; a dummy row has none."""
  prompt_mask: np.ndarray

  @property
  def is_real(self) -> np.ndarray:
    """bool [B]: False on the dummy rows that fill a short last batch."""
    return self.prompt_mask.any(axis=-1)


@flax.struct.dataclass
class PromptBatch(_Rows):
  """Prompts for generation."""
  prompt_ids: np.ndarray  # int32 [B, Lp], left-padded, video tokens inside
  prompt_mask: np.ndarray  # bool [B, Lp]


@flax.struct.dataclass
class PreferenceBatch(_Rows):
  """DPO pairs: one prompt and two responses per row."""
  prompt_ids: np.ndarray  # int32 [B, Lp], left-padded, video tokens inside
  prompt_mask: np.ndarray  # bool [B, Lp]
  chosen_ids: np.ndarray  # int32 [B, Lr], right-padded, eos included
  chosen_mask: np.ndarray  # bool [B, Lr]
  rejected_ids: np.ndarray  # int32 [B, Lr]
  rejected_mask: np.ndarray  # bool [B, Lr]


@flax.struct.dataclass
class SftBatch(_Rows):
  """Supervised examples: prompt, then the rest of the conversation."""
  prompt_ids: np.ndarray  # int32 [B, Lp], left-padded, video tokens inside
  prompt_mask: np.ndarray  # bool [B, Lp]
  target_ids: np.ndarray  # int32 [B, Lt], right-padded
  target_mask: np.ndarray  # bool [B, Lt], True on real tokens
  loss_mask: np.ndarray  # bool [B, Lt], True on answer tokens (the labels)


def bucket_length(length: int, buckets: Sequence[int] = BUCKETS,
                  offset: int = 0) -> int:
  """The smallest `offset + b` (b in buckets) that holds `length` tokens."""
  for b in sorted(buckets):
    if offset + b >= length:
      return offset + b
  raise ValueError(f"{length} tokens exceed the largest bucket "
                   f"{offset} + {max(buckets)}")


def pad(seqs: Sequence[np.ndarray | None], length: int, pad_value, left: bool,
        batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Stacks 1-D sequences into [B, length] values and a bool mask.

  None entries, and rows past the sequences up to `batch_size`, are dummy
  rows: pad values, mask all False.
  """
  batch_size = len(seqs) if batch_size is None else batch_size
  if len(seqs) > batch_size:
    raise ValueError(f"{len(seqs)} sequences for a batch of {batch_size}")
  dtype = next((s.dtype for s in seqs if s is not None), np.int32)
  values = np.full((batch_size, length), pad_value, dtype)
  mask = np.zeros((batch_size, length), bool)
  for row, seq in enumerate(seqs):
    if seq is None:
      continue
    cols = slice(length - len(seq), length) if left else slice(0, len(seq))
    values[row, cols] = seq
    mask[row, cols] = True
  return values, mask


def collate_prompts(prompts: Sequence[np.ndarray | None], batch_size: int,
                    pad_id: int, buckets: Sequence[int] = BUCKETS,
                    prompt_offset: int = 0) -> PromptBatch:
  """A PromptBatch from prompt ids (None marks a dummy row)."""
  return PromptBatch(
      *_pad_prompts(prompts, batch_size, pad_id, buckets, prompt_offset))


def collate_preferences(
    examples: Sequence[tokenize.PreferenceTokens | None], batch_size: int,
    pad_id: int, buckets: Sequence[int] = BUCKETS, prompt_offset: int = 0,
) -> PreferenceBatch:
  """A PreferenceBatch; chosen and rejected share one response length."""
  prompts, chosen, rejected = (
      _field(examples, f) for f in ("prompt", "chosen", "rejected"))
  response_length = bucket_length(max(_max_len(chosen), _max_len(rejected)),
                                  buckets)
  return PreferenceBatch(
      *_pad_prompts(prompts, batch_size, pad_id, buckets, prompt_offset),
      *pad(chosen, response_length, pad_id, False, batch_size),
      *pad(rejected, response_length, pad_id, False, batch_size))


def collate_sft(examples: Sequence[tokenize.SftTokens | None], batch_size: int,
                pad_id: int, buckets: Sequence[int] = BUCKETS,
                prompt_offset: int = 0) -> SftBatch:
  """An SftBatch: prompts left-padded, targets right-padded."""
  targets = _field(examples, "target")
  length = bucket_length(_max_len(targets), buckets)
  target_ids, target_mask = pad(targets, length, pad_id, False, batch_size)
  loss_mask, _ = pad(_field(examples, "loss"), length, False, False,
                     batch_size)
  return SftBatch(
      *_pad_prompts(_field(examples, "prompt"), batch_size, pad_id, buckets,
                    prompt_offset),
      target_ids, target_mask, loss_mask)


def positions(mask: jnp.ndarray) -> jnp.ndarray:
  """int32 positions [..., L] that count real tokens only, 0 at the first."""
  return jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)


def _pad_prompts(prompts, batch_size, pad_id, buckets, prompt_offset):
  length = bucket_length(_max_len(prompts), buckets, prompt_offset)
  return pad(prompts, length, pad_id, True, batch_size)


def _field(examples, name: str) -> list[np.ndarray | None]:
  return [None if e is None else getattr(e, name) for e in examples]


def _max_len(seqs: Sequence[np.ndarray | None]) -> int:
  return max((len(s) for s in seqs if s is not None), default=1)
