"""Streaming generation over a dataset: batches, length buckets, progress, order.

A stage hands an iterable of prompts to `generate` and gets back, prompt by
prompt and in input order, `num_samples` samples each. Prompts are batched as
they come (no look-ahead) with data.batching's contract: left-padded to a
bucket (the video tokens as an offset, so the text length picks the bucket),
and a short last batch filled with dummy rows whose results are dropped. So a
stage runs a few shapes, each compiled once.

On several hosts each host iterates its own prompts; sample keys fold in the
prompt's position in that stream and the host's index (see `prompt_uid`).
"""
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import itertools

import jax
import numpy as np
import tqdm
import transformers

from isr_dpo_jax import sampling
from isr_dpo_jax.data import batching


@dataclasses.dataclass(frozen=True)
class Prompt:
  """Token ids with the video placeholders expanded, and the prompt's video."""
  token_ids: Sequence[int]
  video: np.ndarray | None = None  # float32 [T, H, W, 3], CLIP-normalised


@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated response.

  token_ids holds the generated ids up to and including the stop id (when one
  was produced); text decodes them without special tokens; logprob is the sum
  of their log-probabilities under the model's untempered, unfiltered
  distribution (see sampling.token_logprobs).
  """
  token_ids: np.ndarray
  text: str
  logprob: float
  finish_reason: str  # "eos": a stop id was produced; "length": max_new_tokens

  @property
  def length(self) -> int:
    return len(self.token_ids)


def prompt_uid(position: int) -> int:
  """A prompt's id for its sample keys: unique over hosts, its position on one."""
  return position * jax.process_count() + jax.process_index()


def _videos(prompts: Sequence[Prompt], batch_size: int, first_position: int):
  """[batch_size, T, H, W, 3] (zeros on dummy rows), or None without videos."""
  has_video = [p.video is not None for p in prompts]
  if not any(has_video):
    return None
  if not all(has_video):
    missing = [first_position + i for i, v in enumerate(has_video) if not v]
    raise ValueError(f"prompts {missing} have no video but others in their "
                     "batch do; give every prompt of a stage a video or none")
  videos = np.zeros((batch_size, *prompts[0].video.shape), np.float32)
  videos[:len(prompts)] = np.stack([p.video for p in prompts])
  return videos


def _sample(out: sampling.Generation, row: int,
            tokenizer: transformers.PreTrainedTokenizerBase) -> Sample:
  length = int(out.lengths[row])
  token_ids = out.tokens[row, :length]
  stopped = bool(out.stopped[row])
  text_ids = token_ids[:-1] if stopped else token_ids
  return Sample(token_ids=token_ids,
                text=tokenizer.decode(text_ids, skip_special_tokens=True),
                logprob=float(out.logprobs[row]),
                finish_reason="eos" if stopped else "length")


def generate(sampler: sampling.Sampler, prompts: Iterable[Prompt],
             params: sampling.SamplingParams, *,
             tokenizer: transformers.PreTrainedTokenizerBase, batch_size: int,
             num_samples: int = 1, seed: int = 0,
             buckets: Sequence[int] = batching.BUCKETS,
             progress: bool = True) -> Iterator[list[Sample]]:
  """Yields each prompt's `num_samples` samples, in input order.

  `batch_size` counts prompts per batch on this host; batch_size (and so
  batch_size * num_samples) must divide over the mesh's data axes.
  """
  pad_id = tokenizer.pad_token_id or 0
  bar = tqdm.tqdm(unit="tok", desc="generate", disable=not progress,
                  dynamic_ncols=True)
  position = 0
  stream = iter(prompts)
  while batch := list(itertools.islice(stream, batch_size)):
    videos = _videos(batch, batch_size, position)
    offset = 0 if videos is None else sampler.config.num_video_tokens
    rows = batching.collate_prompts(
        [np.asarray(p.token_ids, np.int32) for p in batch], batch_size,
        pad_id, buckets, prompt_offset=offset)
    uids = np.array([prompt_uid(position + i) for i in range(batch_size)],
                    np.int32)
    out = sampler(rows.prompt_ids, rows.prompt_mask, videos, uids, params,
                  num_samples=num_samples, seed=seed)
    real_rows = len(batch) * num_samples
    bar.update(int(out.lengths[:real_rows].sum()))
    bar.set_postfix(prompts=position + len(batch))
    for first in range(0, real_rows, num_samples):
      yield [_sample(out, r, tokenizer) for r in range(first, first + num_samples)]
    position += len(batch)
  bar.close()
