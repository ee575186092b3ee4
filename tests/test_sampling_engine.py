"""The compiled generation engine against transformers, NumPy and itself."""
import hf_reference as ref
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
import torch
from test_sampling import np_filtered_probs

from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import sampling

PROMPT_LENGTHS = [7, 3, 10, 5]
SAMPLE = sampling.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10,
                                 stop_ids=tuple(range(5, 13)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random transformers Video-LLaVA (GQA) saved with save_pretrained."""
  hf = ref.tiny_model(seed=3, num_kv_heads=2)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  return hf, path


@pytest.fixture(scope="module")
def model(checkpoint):
  return models.load_pretrained(checkpoint[1])


@pytest.fixture(scope="module")
def sampler(model):
  return sampling.Sampler(model)


def _prompts(num_video_tokens, lengths=PROMPT_LENGTHS, seed=0, extra_padding=0):
  """Left-padded ids and mask with videos; extra_padding widens the bucket."""
  ids, mask = ref.video_prompts(lengths, num_video_tokens, seed)
  pad = ((0, 0), (extra_padding, 0))
  return (np.pad(ids, pad).astype(np.int32), np.pad(mask, pad).astype(bool),
          ref.videos(len(lengths), seed))


def _uids(n):
  return np.arange(100, 100 + n, dtype=np.int32)


@torch.no_grad()
def _hf_greedy(hf, ids, mask, videos, steps, eos):
  """transformers' greedy tokens [B, steps] and their log-probs."""
  out = hf.generate(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      pixel_values_videos=torch.from_numpy(videos).permute(0, 1, 4, 2, 3),
      max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=0,
      output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[:, ids.shape[1]:]
  logprobs = torch.log_softmax(torch.stack(out.logits, 1).double(), -1)
  return tokens.numpy(), logprobs.gather(-1, tokens[..., None])[..., 0].numpy()


def test_greedy_matches_transformers_generate(checkpoint, sampler):
  hf, _ = checkpoint
  ids, mask, videos = _prompts(sampler.video.num_tokens)
  steps = 12
  free_run, _ = _hf_greedy(hf, ids, mask, videos, steps, eos=None)
  eos = int(free_run[0, 4])  # row 0 stops by step 4, others may run on
  want, want_logprobs = _hf_greedy(hf, ids, mask, videos, steps, eos=eos)
  params = sampling.SamplingParams(temperature=0, max_new_tokens=steps,
                                   stop_ids=(eos,))
  for extra_padding in (0, 5):  # a wider bucket changes nothing
    ids_p, mask_p, _ = _prompts(sampler.video.num_tokens,
                                extra_padding=extra_padding)
    got = sampler(ids_p, mask_p, videos, _uids(len(ids)), params)
    for row in range(len(ids)):
      hits = np.flatnonzero(want[row] == eos)
      length = hits[0] + 1 if hits.size else steps
      assert (got.lengths[row], got.stopped[row]) == (length, bool(hits.size))
      np.testing.assert_array_equal(got.tokens[row, :length], want[row, :length])
      np.testing.assert_array_equal(got.tokens[row, length:], 0)
      tolerance.assert_close(got.logprobs[row],
                             want_logprobs[row, :length].sum())
  assert got.stopped[0] and got.lengths.max() > got.lengths[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 10, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.9)])
def test_first_token_follows_the_filtered_softmax(model, sampler, temperature,
                                                  top_k, top_p):
  ids, mask, videos = _prompts(model.config.num_video_tokens, [6], seed=4)
  logits = model(jnp.asarray(ids), videos=jnp.asarray(videos),
                 attention_mask=jnp.asarray(mask))
  want = np_filtered_probs(np.asarray(logits[:, -1]), temperature, top_k,
                           top_p)[0]
  assert 3 < np.count_nonzero(want) < len(want)  # the filter matters
  draws = 8192
  params = sampling.SamplingParams(temperature=temperature, top_k=top_k,
                                   top_p=top_p, max_new_tokens=1)
  out = sampler(ids, mask, videos, _uids(1), params, num_samples=draws, seed=1)
  empirical = np.bincount(out.tokens[:, 0], minlength=len(want)) / draws
  assert np.all(empirical[want == 0] == 0)
  # Expected TV for 8192 draws over <= 96 tokens is below 0.03.
  assert 0.5 * np.abs(empirical - want).sum() < 0.05


def test_n_samples_from_one_prefill_equal_independent_runs(sampler):
  ids, mask, videos = _prompts(sampler.video.num_tokens, seed=5)
  shared = sampler(ids, mask, videos, _uids(len(ids)), SAMPLE, num_samples=3)
  for j in range(3):
    alone = sampler(ids, mask, videos, _uids(len(ids)), SAMPLE, first_sample=j)
    for field in ("tokens", "lengths", "stopped"):
      np.testing.assert_array_equal(getattr(shared, field)[j::3],
                                    getattr(alone, field))
    tolerance.assert_close(shared.logprobs[j::3], alone.logprobs)
  assert len({tuple(t) for t in shared.tokens}) == len(shared.tokens)
  assert shared.stopped.any() and not shared.stopped.all()


def test_samples_do_not_depend_on_batch_composition(sampler):
  ids, mask, videos = _prompts(sampler.video.num_tokens, seed=6)
  uids = _uids(len(ids))
  together = sampler(ids, mask, videos, uids, SAMPLE, num_samples=2, seed=9)
  order = [2, 0, 3, 1]
  shuffled = sampler(ids[order], mask[order], videos[order], uids[order],
                     SAMPLE, num_samples=2, seed=9)
  rows = np.ravel([[2 * i, 2 * i + 1] for i in order])
  np.testing.assert_array_equal(shuffled.tokens, together.tokens[rows])
  other_seed = sampler(ids, mask, videos, uids, SAMPLE, num_samples=2, seed=10)
  assert not np.array_equal(other_seed.tokens, together.tokens)


def test_a_second_batch_of_the_same_bucket_does_not_retrace(model, monkeypatch):
  traces = []
  decoder = models.Llama._decoder  # every prefill and decode step runs it

  def counted(self, *args, **kwargs):
    traces.append(args[0].shape)
    return decoder(self, *args, **kwargs)

  monkeypatch.setattr(models.Llama, "_decoder", counted)
  sampler = sampling.Sampler(model)
  n = model.config.num_video_tokens
  sampler(*_prompts(n, seed=7), _uids(4), SAMPLE, num_samples=2)
  first = len(traces)
  assert first == 2  # one prefill, one decode step (traced once in the loop)
  sampler(*_prompts(n, [9, 2, 10, 8], seed=8), _uids(4), SAMPLE, num_samples=2)
  assert len(traces) == first
  sampler(*_prompts(n, seed=7, extra_padding=3), _uids(4), SAMPLE, num_samples=2)
  assert len(traces) == first + 2  # a new bucket is a new program


def test_sharded_generation_equals_single_device(checkpoint, sampler):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sampling.Sampler(models.load_pretrained(checkpoint[1], mesh=mesh),
                             mesh)
  ids, mask, videos = _prompts(sampler.video.num_tokens, seed=11)
  for params in (SAMPLE, sampling.SamplingParams(temperature=0, max_new_tokens=8)):
    want = sampler(ids, mask, videos, _uids(4), params, num_samples=2)
    got = sharded(ids, mask, videos, _uids(4), params, num_samples=2)
    for field in ("tokens", "lengths", "stopped"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4)
  with pytest.raises(ValueError, match="3 prompts per process does not split"):
    sharded(ids[:3], mask[:3], videos[:3], _uids(3), SAMPLE)
  _, carry = sharded._prefill(sharded.state, sharded._put(ids),
                              sharded._put(mask), sharded._put(videos),
                              num_samples=2, max_new_tokens=8)
  keys = carry.cache.keys[0]
  assert keys.addressable_shards[0].data.shape[0] == keys.shape[0] // 4


def _split_prompts(num_video_tokens, seed):
  """Two prompts with a video, each continued by two suffixes (row b * 2 + j
  continues prompt b), left-padded; and those four rows written out whole."""
  ids, mask, videos = _prompts(num_video_tokens, [6, 3], seed=seed)
  rng = np.random.default_rng(seed)
  suffixes = [rng.integers(3, 40, n) for n in (4, 7, 1, 5)]
  width = max(map(len, suffixes)) + 2  # a wider bucket than the longest
  suffix_ids, suffix_mask = np.zeros((4, width), np.int32), np.zeros((4, width), bool)
  whole = []
  for row, suffix in enumerate(suffixes):
    suffix_ids[row, width - len(suffix):], suffix_mask[row, width - len(suffix):] = suffix, True
    whole.append(np.concatenate([ids[row // 2][mask[row // 2]], suffix]))
  length = max(map(len, whole))
  whole_ids, whole_mask = np.zeros((4, length), np.int32), np.zeros((4, length), bool)
  for row, w in enumerate(whole):
    whole_ids[row, length - len(w):], whole_mask[row, length - len(w):] = w, True
  return (ids, mask, videos, suffix_ids, suffix_mask), (whole_ids, whole_mask,
                                                        np.repeat(videos, 2, axis=0))


def test_suffixes_continue_their_shared_prompt_as_the_whole_prompts_do(sampler):
  """A judge's two orders share one run of their common start (and one video
  encoding), and score and generate as the orders written out whole."""
  (ids, mask, videos, suffix_ids, suffix_mask), whole = _split_prompts(
      sampler.video.num_tokens, seed=12)
  tolerance.assert_close(
      sampler.next_token_logprobs(ids, mask, videos, suffix_ids, suffix_mask),
      sampler.next_token_logprobs(*whole))
  greedy = sampling.SamplingParams(temperature=0, max_new_tokens=8)
  uids = _uids(2)
  for params in (greedy, SAMPLE):
    shared = sampler(ids, mask, videos, uids, params, num_samples=2,
                     suffix_ids_NxM=suffix_ids, suffix_mask_NxM=suffix_mask)
    for j in range(2):  # row b * 2 + j draws with sample j's key of prompt b
      alone = sampler(*(x[j::2] for x in whole), uids, params, first_sample=j)
      for field in ("tokens", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(shared, field)[j::2],
                                      getattr(alone, field))
      tolerance.assert_close(shared.logprobs[j::2], alone.logprobs)
