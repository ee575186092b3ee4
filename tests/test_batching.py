"""Batch contract: padding sides, buckets, dummy rows, positions."""
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from isr_dpo_jax.data import batching
from isr_dpo_jax.data import tokenize

PAD = 0
seqs = st.lists(
    st.integers(1, 40).map(lambda n: np.arange(1, n + 1, dtype=np.int32)),
    min_size=1, max_size=5)


def unpad(ids, mask):
  return [row[m] for row, m in zip(ids, mask)]


def test_bucket_length():
  assert batching.bucket_length(1) == 64
  assert batching.bucket_length(64) == 64
  assert batching.bucket_length(65) == 128
  assert batching.bucket_length(2100, offset=2048) == 2048 + 64
  assert batching.bucket_length(10, buckets=(32, 16)) == 16
  with pytest.raises(ValueError, match="largest bucket"):
    batching.bucket_length(5000)


@settings(max_examples=30, deadline=None)
@given(seqs, st.booleans(), st.integers(0, 3))
def test_pad_keeps_tokens_on_the_right_side(sequences, left, extra_rows):
  length = max(map(len, sequences)) + 2
  ids, mask = batching.pad(sequences, length, PAD, left,
                           batch_size=len(sequences) + extra_rows)
  assert ids.shape == mask.shape == (len(sequences) + extra_rows, length)
  for row, seq in zip(unpad(ids, mask), sequences):
    np.testing.assert_array_equal(row, seq)
  for m, seq in zip(mask, sequences):
    real = np.flatnonzero(m)
    # One contiguous run, flush with the left or right end.
    assert len(real) == len(seq) and real[-1] - real[0] == len(seq) - 1
    assert real[-1] == length - 1 if left else real[0] == 0
  assert not mask[len(sequences):].any() and (ids[~mask] == PAD).all()


def test_collate_preferences_contract():
  examples = [
      tokenize.PreferenceTokens(np.arange(1, 71, dtype=np.int32),
                                np.array([5, 6, 2], np.int32),
                                np.array([7, 2], np.int32)),
      tokenize.PreferenceTokens(np.arange(1, 11, dtype=np.int32),
                                np.arange(3, 70, dtype=np.int32),
                                np.array([9, 9, 9, 2], np.int32)),
      None,
  ]
  batch = batching.collate_preferences(examples, batch_size=4, pad_id=PAD,
                                       prompt_offset=32)
  assert batch.prompt_ids.shape == (4, 32 + 64)
  assert batch.chosen_ids.shape == batch.rejected_ids.shape == (4, 128)
  assert batch.prompt_ids.dtype == np.int32 and batch.chosen_mask.dtype == bool
  np.testing.assert_array_equal(batch.is_real, [True, True, False, False])
  for field in ("prompt", "chosen", "rejected"):
    rows = unpad(getattr(batch, f"{field}_ids"),
                 getattr(batch, f"{field}_mask"))
    for row, example in zip(rows, examples[:2]):
      np.testing.assert_array_equal(row, getattr(example, field))
  assert batch.prompt_mask[:2, -1].all() and batch.chosen_mask[:2, 0].all()
  # A pytree of arrays, ready for jax.device_put and jit.
  assert len(jax.tree.leaves(batch)) == 6


def test_collate_sft_and_prompts():
  sft = tokenize.SftTokens(np.array([1, 4, 4, 8], np.int32),
                           np.array([5, 2, 9, 9, 6, 2], np.int32),
                           np.array([1, 1, 0, 0, 1, 1], bool))
  batch = batching.collate_sft([sft], batch_size=2, pad_id=PAD, buckets=(8, 16))
  assert batch.prompt_ids.shape == (2, 8) and batch.target_ids.shape == (2, 8)
  np.testing.assert_array_equal(batch.loss_mask[0], [1, 1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch.target_mask[0], [1] * 6 + [0, 0])
  assert not batch.loss_mask[1].any() and list(batch.is_real) == [True, False]
  prompts = batching.collate_prompts([sft.prompt, None], 3, PAD, buckets=(4,))
  np.testing.assert_array_equal(prompts.prompt_ids[0], sft.prompt)
  np.testing.assert_array_equal(prompts.is_real, [True, False, False])


def test_positions_count_real_tokens_only():
  rng = np.random.default_rng(0)
  mask = rng.random((6, 20)) < 0.6
  got = np.asarray(batching.positions(mask))
  assert got.dtype == np.int32 and got.shape == mask.shape
  for b, i in zip(*np.nonzero(mask)):
    assert got[b, i] == mask[b, :i].sum()  # Real tokens before this one.


def test_positions_of_left_padded_prompt_and_response_are_contiguous():
  examples = [tokenize.PreferenceTokens(np.arange(1, n + 1, dtype=np.int32),
                                        np.arange(1, r + 1, dtype=np.int32),
                                        np.array([2], np.int32))
              for n, r in [(3, 5), (9, 1)]]
  batch = batching.collate_preferences(examples, 2, PAD, buckets=(16,))
  mask = np.concatenate([batch.prompt_mask, batch.chosen_mask], axis=1)
  pos = np.asarray(batching.positions(mask))
  for row, (n, r) in enumerate([(3, 5), (9, 1)]):
    np.testing.assert_array_equal(pos[row][mask[row]], np.arange(n + r))
