"""The streaming driver: real videos in, samples out in input order."""

import conftest
import hf_reference as ref
import numpy as np
import pytest
import tolerance
import tokenizers
import torch
import transformers

from isr_dpo_jax import generate
from isr_dpo_jax import models
from isr_dpo_jax import sampling
from isr_dpo_jax.data import batching
from isr_dpo_jax.data import video

PARAMS = sampling.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8,
                                 stop_ids=(2, 10, 11, 12, 13))


pytestmark = conftest.needs_real_clips


@pytest.fixture(scope="module")
def hf_model():
  return ref.tiny_model(seed=5)


@pytest.fixture(scope="module")
def sampler(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  hf_model.save_pretrained(path)
  return sampling.Sampler(models.load_pretrained(path))


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer over the tiny model's 96 ids."""
  words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, ref.IMAGE_ID)]
  vocab = {w: i for i, w in enumerate(words + ["<image>", "<video>"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
      unk_token="<unk>", additional_special_tokens=["<image>", "<video>"])


@pytest.fixture(scope="module")
def prompts(sampler):
  """Five prompts over the two real clips, text lengths 3 to 11; one has a
  stable uid, the others take their stream position."""
  clips = [video.preprocess(video.read_video(p, ref.NUM_FRAMES), ref.IMAGE_SIZE)
           for p in conftest.REAL_CLIPS]
  rng = np.random.default_rng(0)
  placeholders = [ref.VIDEO_ID] * sampler.video.num_tokens
  return [generate.Prompt([1] + placeholders + rng.integers(4, 90, n).tolist(),
                          clips[i % len(clips)], uid=uid)
          for i, (n, uid) in enumerate(
              [(3, None), (11, None), (6, 777), (9, None), (4, None)])]


def test_results_come_in_input_order_and_equal_direct_calls(
    sampler, tokenizer, prompts):
  results = list(generate.generate(sampler, iter(prompts), PARAMS,
                                   tokenizer=tokenizer, batch_size=2,
                                   num_samples=2, seed=3, progress=False))
  assert [len(r) for r in results] == [2] * len(prompts)
  for position, (prompt, samples) in enumerate(zip(prompts, results)):
    # The same prompt as the only real row of a batch: its samples are fixed
    # by its uid, whatever shares its batch.
    uid = position if prompt.uid is None else prompt.uid
    rows = batching.collate_prompts([np.asarray(prompt.token_ids)], 2, 0,
                                    prompt_offset=sampler.video.num_tokens)
    videos = np.stack([prompt.video, np.zeros_like(prompt.video)])
    direct = sampler(rows.prompt_ids, rows.prompt_mask, videos,
                     np.array([uid, 0], np.int32), PARAMS, num_samples=2,
                     seed=3)
    for j, sample in enumerate(samples):
      np.testing.assert_array_equal(
          sample.token_ids, direct.tokens[j, :direct.lengths[j]])
      tolerance.assert_close(sample.logprob, direct.logprobs[j])
  finished = [s for r in results for s in r]
  assert {s.finish_reason for s in finished} == {"eos", "length"}
  for s in finished:
    stopped = s.token_ids[-1] in PARAMS.stop_ids
    assert s.finish_reason == ("eos" if stopped else "length")
    assert stopped or s.length == PARAMS.max_new_tokens
    text_ids = s.token_ids[:-1] if stopped else s.token_ids
    assert s.text == " ".join(f"w{t}" for t in text_ids if 4 <= t < ref.IMAGE_ID)


def test_a_batch_mixing_prompts_with_and_without_video_is_refused(
    sampler, tokenizer, prompts):
  mixed = [prompts[0], generate.Prompt(prompts[1].token_ids, None), prompts[2]]
  with pytest.raises(ValueError, match=r"prompts \[1\] have no video"):
    list(generate.generate(sampler, mixed, PARAMS, tokenizer=tokenizer,
                           batch_size=4, progress=False))


def test_next_token_logprobs_match_transformers(hf_model, sampler, prompts):
  got = generate.next_token_logprobs(sampler, prompts, range(ref.VOCAB), pad_id=0,
                                    batch_size=2)
  assert got.shape == (len(prompts), ref.VOCAB)
  for prompt, row in zip(prompts, got):
    ids = np.asarray([prompt.token_ids])
    logits = ref.logits(hf_model, ids, np.ones_like(ids), prompt.video[None])
    want = torch.log_softmax(torch.from_numpy(logits[0, -1]).double(), -1)
    np.testing.assert_allclose(row, want.numpy(), atol=1e-4)


def test_prompts_with_suffixes_generate_and_score_as_the_whole_questions(
    sampler, tokenizer, prompts):
  """A judge's orders as one prompt with two suffixes: the same greedy
  samples and next-token log-probs as each order written out whole, also
  where a batch runs part of the shared prompt in the suffixes to fit a
  smaller bucket (buckets 8 and 16: 5 of the 21 shared text tokens move)."""
  rng = np.random.default_rng(1)
  shared = [generate.Prompt(list(p.token_ids) + rng.integers(4, 90, 20 - n).tolist(),
                            p.video, uid=100 + i,
                            suffixes=(rng.integers(4, 90, 3).tolist(),
                                      rng.integers(4, 90, 5).tolist()))
            for i, (p, n) in enumerate(zip(prompts, (3, 11, 6, 9, 4)))]
  whole = [generate.Prompt(list(p.token_ids) + s, p.video)
           for p in shared for s in p.suffixes]
  greedy = sampling.SamplingParams(temperature=0, max_new_tokens=6)
  run = lambda ps, n, buckets: [s.token_ids for r in generate.generate(
      sampler, ps, greedy, tokenizer=tokenizer, batch_size=2, num_samples=n,
      buckets=buckets, progress=False) for s in r]
  score = lambda ps, n, buckets: generate.next_token_logprobs(
      sampler, ps, range(ref.VOCAB), pad_id=0, batch_size=2, num_suffixes=n,
      buckets=buckets)
  want_tokens, want_logprobs = run(whole, 1, (64,)), score(whole, 1, (64,))
  for buckets in ((8, 16), (64,)):
    for got, want in zip(run(shared, 2, buckets), want_tokens, strict=True):
      np.testing.assert_array_equal(got, want)
    tolerance.assert_close(score(shared, 2, buckets), want_logprobs)
