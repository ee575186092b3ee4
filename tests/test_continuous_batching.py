"""Continuous batching: prompts refill freed slots, and each prompt's samples
are what it gets generated alone."""
import dataclasses

import hf_reference as ref
import numpy as np
import pytest
import tolerance

from isr_dpo_jax import generate
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import sampling

STOPS = (2, 7, 11, 13, 17, 19, 23, 29)  # ~1 in 12 ids: rows stop at many lengths
SAMPLED = sampling.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12,
                                  stop_ids=STOPS)
GREEDY = sampling.SamplingParams(temperature=0, max_new_tokens=12, stop_ids=STOPS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  ref.tiny_model(seed=8, num_kv_heads=2).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(checkpoint):
  return models.load_pretrained(checkpoint)


@pytest.fixture(scope="module")
def sampler(model):
  return sampling.Sampler(model)


@pytest.fixture(scope="module")
def tokenizer():
  return ref.word_tokenizer()


def _prompts(sampler, text_lengths, seed):
  """Prompts with a video and text of the given lengths; every third has a
  stable uid, the others take their stream position."""
  rng = np.random.default_rng(seed)
  placeholders = [ref.VIDEO_ID] * sampler.video.num_tokens
  clips = ref.videos(len(text_lengths), seed)
  return [generate.Prompt([1] + placeholders + rng.integers(3, 90, n).tolist(),
                          clip, uid=None if i % 3 else 1000 + i)
          for i, (n, clip) in enumerate(zip(text_lengths, clips))]


def _alone(sampler, prompt, uid, params, num_samples, seed):
  """The prompt as the only row of a static batch of its own width."""
  ids = np.asarray([prompt.token_ids], np.int32)
  return sampler(ids, np.ones_like(ids, bool), prompt.video[None],
                 np.array([uid], np.int32), params, num_samples=num_samples,
                 seed=seed)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_continuous_batching_returns_what_each_prompt_gets_alone(
    sampler, tokenizer, params, num_samples):
  """Nine prompts through two slots, their text 2 to 27 tokens (buckets 8, 16
  and 32: the slots' keys widen on the way), rows stopping at different
  lengths: every sample equals the prompt's own one-prompt run."""
  prompts = _prompts(sampler, [3, 2, 9, 5, 14, 27, 4, 20, 6], seed=num_samples)
  results = list(generate.generate(
      sampler, iter(prompts), params, tokenizer=tokenizer, batch_size=2,
      num_samples=num_samples, seed=4, buckets=(8, 16, 32), progress=False))
  assert len(results) == len(prompts)
  lengths = {s.length for r in results for s in r}
  assert len(lengths) > 1, lengths  # slots free at different steps
  for position, (prompt, samples) in enumerate(zip(prompts, results)):
    alone = _alone(sampler, prompt, generate.prompt_uid(prompt, position),
                   params, num_samples, seed=4)
    for j, sample in enumerate(samples):
      np.testing.assert_array_equal(sample.token_ids,
                                    alone.tokens[j, :alone.lengths[j]])
      assert (sample.finish_reason == "eos") == alone.stopped[j]
      tolerance.assert_close(sample.logprob, alone.logprobs[j])


def _kept_sizes(monkeypatch):
  """The slot counts that Slots.keep moves a drain into, as it is called."""
  sizes, keep = [], sampling.Slots.keep

  def recorded(self, slots_G):
    sizes.append(len(slots_G))
    return keep(self, slots_G)

  monkeypatch.setattr(sampling.Slots, "keep", recorded)
  return sizes


def test_a_drain_moved_into_fewer_slots_returns_what_each_prompt_gets_alone(
    sampler, tokenizer, monkeypatch):
  """Twelve prompts through eight slots: once the stream is out, the prompts
  still running move into 2 slots (the ring index and every row's
  keys, positions and draws kept), and each sample is still its prompt's
  own one-prompt run."""
  sizes = _kept_sizes(monkeypatch)
  prompts = _prompts(sampler, [3, 2, 9, 5, 14, 27, 4, 20, 6, 11, 8, 2], seed=11)
  params = dataclasses.replace(SAMPLED, max_new_tokens=24)
  results = list(generate.generate(
      sampler, prompts, params, tokenizer=tokenizer, batch_size=8,
      num_samples=2, seed=4, buckets=(8, 16, 32), progress=False))
  assert sizes and set(sizes) <= {1, 2}, sizes  # 8 slots, then a quarter
  for position, (prompt, samples) in enumerate(zip(prompts, results, strict=True)):
    alone = _alone(sampler, prompt, generate.prompt_uid(prompt, position),
                   params, 2, seed=4)
    for j, sample in enumerate(samples):
      np.testing.assert_array_equal(sample.token_ids,
                                    alone.tokens[j, :alone.lengths[j]])
      tolerance.assert_close(sample.logprob, alone.logprobs[j])


def test_continuous_equals_static_batches(sampler, tokenizer):
  """The same samples as the engine run batch by batch (static=True)."""
  prompts = _prompts(sampler, [5, 12, 3, 8, 7, 2, 10], seed=5)
  run = lambda static: [s for r in generate.generate(
      sampler, prompts, SAMPLED, tokenizer=tokenizer, batch_size=2,
      num_samples=2, seed=1, progress=False, static=static) for s in r]
  for got, want in zip(run(False), run(True), strict=True):
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    tolerance.assert_close(got.logprob, want.logprob)


def test_refilling_slots_does_not_retrace(model, tokenizer, monkeypatch):
  """After a first stream has compiled the programs of its shapes (slots,
  prefix width, the insert sizes), a longer stream in the same bucket refills
  its slots many more times and traces nothing."""
  traces = []
  decoder = models.Llama._decoder  # every prefill and decode step runs it

  def counted(self, *args, **kwargs):
    traces.append(1)
    return decoder(self, *args, **kwargs)

  monkeypatch.setattr(models.Llama, "_decoder", counted)
  fresh = sampling.Sampler(model)  # its own jit caches
  run = lambda prompts: list(generate.generate(
      fresh, prompts, SAMPLED, tokenizer=tokenizer, batch_size=2,
      num_samples=2, buckets=(16,), progress=False))
  run(_prompts(fresh, [3, 9, 5, 12, 4], seed=6))
  first = len(traces)
  assert first > 0
  run(_prompts(fresh, [7, 2, 11, 6, 13, 3, 8, 10, 5, 9, 4, 12], seed=7))
  assert len(traces) == first


def test_each_device_prefills_the_prompts_of_its_own_slots(
    checkpoint, sampler, tokenizer, monkeypatch):
  """On 4 data shards of 4 slots each (x 2 tensor shards), every prompt is
  prefilled on its slot's devices (the insert writes no other shard's slots)
  and a drain moves into 1 slot a device, each prompt staying on its device:
  the samples are one device's, and a row or a kept slot meant for another
  shard is refused."""
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  sharded = sampling.Sampler(models.load_pretrained(checkpoint, mesh=mesh), mesh)
  prompts = _prompts(sampler, [3, 2, 9, 5, 14, 27, 4, 20, 6, 7, 3, 11] * 2, seed=9)
  run = lambda engine: [s for r in generate.generate(
      engine, prompts, SAMPLED, tokenizer=tokenizer, batch_size=16, num_samples=2,
      seed=2, buckets=(8, 16, 32), progress=False) for s in r]
  want = run(sampler)
  sizes = _kept_sizes(monkeypatch)
  for got, want in zip(run(sharded), want, strict=True):
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    tolerance.assert_close(got.logprob, want.logprob)
  assert sizes == [4], sizes  # a quarter of 16 slots: one a device

  slots = sharded.slots(8, 8, SAMPLED, num_samples=2)
  ids = np.ones((4, 8), np.int32)
  with pytest.raises(ValueError, match=r"rows \[0\] would go to slots \[2\] on other"):
    slots.insert(ids, ids > 0, None, [2, 3, 4, 6], np.arange(4))
  with pytest.raises(ValueError, match=r"new slots \[0, 1\] would hold slots \[2, 0\]"):
    slots.keep([2, 0, 4, 6])
