"""Streaming generation over a dataset: batches, buckets, progress, order.

A stage hands an iterable of prompts to `generate` and gets back, prompt by
prompt and in input order, `num_samples` samples each. Prompts are taken as
they come (no look-ahead) into batch_size slots (continuous batching,
sampling.Slots): a prompt whose samples have all stopped leaves its slot to
the next, so short answers do not wait for long ones, and the last few
prompts finish in fewer slots (a step costs about its rows). Prompts are
prefilled with data.batching's contract: left-padded to a bucket (the video
tokens as an offset, so the text length picks the bucket), a batch short of
a size filled with dummy rows whose results are dropped. So a stage runs a
few shapes, each compiled once. Prompts with suffixes (a judge's two orders) run
in static batches, each until its longest row stops.

A prompt's samples are drawn with keys from its uid: a stable id given with
the prompt (`stable_uid` of its record id, so that a resumed stage draws the
same samples), or else its position in the stream. On several hosts each
host iterates its own prompts; position uids then fold in the host's index.
"""
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import itertools
import math
import zlib

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm
import transformers

from isr_dpo_jax import sampling
from isr_dpo_jax.data import batching


@dataclasses.dataclass(frozen=True)
class Prompt:
  """Token ids with the video placeholders expanded, the video, a stable id.

  With suffixes (text tokens, no video placeholder), the prompt is n
  questions that start alike, e.g. a judge's two orders: token_ids is their
  common start (the video placeholders in it), run once, and sample j
  continues it with suffixes[j] (num_samples = n). A batch may run fewer of
  token_ids once, the rest in front of each suffix, to fit a smaller bucket.
  """
  token_ids: Sequence[int]
  video: np.ndarray | None = None  # float32 [T, H, W, 3], CLIP-normalised
  uid: int | None = None  # int32 range; None: from the stream position
  suffixes: tuple[Sequence[int], ...] = ()


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


def stable_uid(*parts) -> int:
  """A prompt's uid from what names it (a stage, a record id): 31 bits of
  its CRC-32, the same in every run and on every host."""
  return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def prompt_uid(prompt: Prompt, position: int) -> int:
  """The id a prompt's sample keys derive from (see the module doc)."""
  if prompt.uid is not None:
    return prompt.uid
  return position * jax.process_count() + jax.process_index()


def _videos(prompts: Sequence[Prompt], batch_size: int, first_position: int,
            video_shape: tuple[int, ...]) -> np.ndarray:
  """[batch_size, T, H, W, 3] videos of the prompts; zeros on dummy rows."""
  missing = [first_position + i for i, p in enumerate(prompts)
             if p.video is None]
  if missing:
    raise ValueError(f"prompts {missing} have no video but others in their "
                     "batch do; give every prompt of a stage a video or none")
  videos = np.zeros((batch_size, *video_shape), np.float32)
  if prompts:
    videos[:len(prompts)] = np.stack([p.video for p in prompts])
  return videos


def _agreed(local: np.ndarray) -> np.ndarray:
  """The elementwise maximum of `local` over all processes."""
  if jax.process_count() == 1:
    return local
  return multihost_utils.process_allgather(local).max(axis=0)


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


@dataclasses.dataclass(frozen=True)
class _Batch:
  position: int  # stream position of the first prompt
  real: int  # prompts in the batch; the rest are dummy rows
  rows: batching.PromptBatch
  videos: np.ndarray | None
  uids: np.ndarray  # int32 [batch_size]
  suffixes: tuple  # ids and mask [batch_size * n, M], or (None, None)


def _shared_width(batch: Sequence[Prompt], num_samples: int, widths: Sequence[int], buckets: Sequence[int],
                  video_id: int) -> tuple[int, int]:
  """How many tokens of its prompts a batch with suffixes runs once, and
  the suffixes' width: the widths (buckets) that pad the batch to the fewest
  tokens in all, a prompt's tokens past the first joining each of its
  suffixes. The prompts' part keeps the video placeholders; every process
  agrees on both widths.
  """
  def video_end(ids):
    hits = np.flatnonzero(np.asarray(ids) == video_id)
    return int(hits[-1]) + 1 if hits.size else 0

  need = [max((len(s) + max(0, len(p.token_ids) - w)
               for p in batch for s in p.suffixes), default=1) for w in widths]
  end, *need = _agreed(np.array(
      [max((video_end(p.token_ids) for p in batch), default=0), *need]))
  splits = [(w, batching.bucket_length(n, buckets))
            for w, n in zip(widths, need) if w >= end and n <= max(buckets)]
  if not splits:
    raise ValueError(f"suffixes exceed the largest bucket {max(buckets)}")
  return min(splits, key=lambda split: split[0] + num_samples * split[1])


def _rows(batch: Sequence[Prompt], batch_size: int, num_samples: int,
          width: int, suffix_width: int, pad_id: int) -> tuple:
  """The prompts cut at width, left-padded [batch_size, width], and their
  suffixes [batch_size * n, suffix_width], each after what the cut left."""
  prompts = batching.pad([np.asarray(p.token_ids[:width], np.int32) for p in batch],
                         width, pad_id, left=True, batch_size=batch_size)
  suffixes = batching.pad(
      [np.concatenate([p.token_ids[width:], s]).astype(np.int32)
       for p in batch for s in p.suffixes],
      suffix_width, pad_id, left=True, batch_size=batch_size * num_samples)
  return batching.PromptBatch(*prompts), suffixes


def _batches(sampler: sampling.Sampler, prompts: Iterable[Prompt],
             batch_size: int, pad_id: int, buckets: Sequence[int],
             num_samples: int = 1):
  position = 0
  stream = iter(prompts)
  while True:
    batch = list(itertools.islice(stream, batch_size))
    longest = max((len(p.token_ids) for p in batch), default=1)
    any_suffix = any(p.suffixes for p in batch)
    any_video = any(p.video is not None for p in batch)
    real_anywhere, longest, any_suffix, any_video = _agreed(
        np.array([len(batch), longest, any_suffix, any_video]))
    if not real_anywhere:
      return
    videos = (_videos(batch, batch_size, position, sampler.video.frames_shape)
              if any_video else None)
    offset = sampler.video.num_tokens if any_video else 0
    if any_suffix:
      if any(len(p.suffixes) != num_samples for p in batch):
        raise ValueError("prompts with suffixes need one per sample: "
                         f"{num_samples} each")
      widths = [offset + b for b in sorted(buckets)]
      widths = [w for w in widths if w < longest] + [w for w in widths if w >= longest][:1]
      rows, suffixes = _rows(batch, batch_size, num_samples, *_shared_width(
          batch, num_samples, widths, buckets,
          sampler.video.token_id), pad_id)
    else:
      rows = batching.PromptBatch(*batching.pad(
          [np.asarray(p.token_ids, np.int32) for p in batch],
          batching.bucket_length(longest, buckets, offset), pad_id,
          left=True, batch_size=batch_size))
      suffixes = None, None
    uids = np.zeros(batch_size, np.int32)
    uids[:len(batch)] = [prompt_uid(p, position + i)
                         for i, p in enumerate(batch)]
    yield _Batch(position, len(batch), rows, videos, uids, suffixes)
    position += len(batch)


def _static(sampler: sampling.Sampler, prompts: Iterable[Prompt],
            params: sampling.SamplingParams, *, batch_size: int,
            num_samples: int, seed: int, pad_id: int,
            buckets: Sequence[int]) -> Iterator[tuple[int, sampling.Generation, int]]:
  """Batch by batch, each run until its longest row stops: yields (stream
  position, the batch's samples, the prompt's first row), in order."""
  for b in _batches(sampler, prompts, batch_size, pad_id, buckets, num_samples):
    suffix_ids, suffix_mask = b.suffixes
    out = sampler(b.rows.prompt_ids, b.rows.prompt_mask, b.videos, b.uids,
                  params, num_samples=num_samples, seed=seed,
                  suffix_ids_NxM=suffix_ids, suffix_mask_NxM=suffix_mask)
    for i in range(b.real):
      yield b.position + i, out, i * num_samples


def _spread(sampler: sampling.Sampler, free: list[int], count: int,
            slots: int) -> list[int]:
  """`count` of the free slots, taken in turn from each device's block of
  slots (Sampler.slot_devices): a prompt is prefilled on the device of its
  slot (sampling.Slots.insert), so an insert needs as many rows a device as
  the busiest device gets prompts."""
  devices = sampler.slot_devices(free, slots)
  by_device = [[s for s, d in zip(free, devices) if d == device]
               for device in range(sampler.row_shards)]
  turns = itertools.chain.from_iterable(itertools.zip_longest(*by_device))
  return [s for s in turns if s is not None][:count]


def _rows_each(sampler: sampling.Sampler, chosen: list[int], slots: int) -> int:
  """An insert's rows a device for the chosen slots: a power of two (few
  shapes), at least the most prompts one device gets."""
  shards = sampler.row_shards
  busiest = np.bincount(sampler.slot_devices(chosen, slots), minlength=shards).max()
  return min(2 ** math.ceil(math.log2(max(busiest, 1))), slots // shards)


def _fill(sampler: sampling.Sampler, slots: sampling.Slots | None,
          new: list[Prompt], chosen: list[int], position: int, rows_each: int,
          longest: int, any_video: bool, params: sampling.SamplingParams, *,
          batch_size: int, num_samples: int, seed: int, pad_id: int,
          buckets: Sequence[int]) -> sampling.Slots:
  """Prefills the prompts `new` (stream positions from `position`) into the
  chosen slots, rows_each rows a device, each prompt in a row of its slot's
  device; makes the slots at the first call and widens them to a longer
  bucket. rows_each, longest and any_video are agreed over processes."""
  offset = sampler.video.num_tokens if any_video else 0
  width = batching.bucket_length(longest, buckets, offset)
  if slots is None:
    slots = sampler.slots(batch_size, width, params, num_samples=num_samples,
                          seed=seed)
  slots.widen(width)
  shards = sampler.row_shards
  next_row = [d * rows_each for d in range(shards)]  # device d's rows come next
  row_of = []  # each new prompt's row
  for device in sampler.slot_devices(chosen, batch_size):
    row_of.append(next_row[device])
    next_row[device] += 1
  size = shards * rows_each
  into = np.full(size, -1)
  into[row_of] = chosen
  ids = [None] * size
  uids = np.zeros(size, np.int32)
  for i, (p, row) in enumerate(zip(new, row_of)):
    ids[row] = np.asarray(p.token_ids, np.int32)
    uids[row] = prompt_uid(p, position + i)
  rows = batching.PromptBatch(*batching.pad(ids, width, pad_id, left=True))
  videos = None
  if any_video:
    videos = np.zeros((size, *sampler.video.frames_shape), np.float32)
    videos[row_of] = _videos(new, len(new), position, sampler.video.frames_shape)
  slots.insert(rows.prompt_ids, rows.prompt_mask, videos, into, uids)
  return slots


def _compact(sampler: sampling.Sampler, slots: sampling.Slots,
             held: list[int | None]) -> list[int | None]:
  """Once the stream is out, moves the running prompts into a quarter of the
  slots or fewer (a power of two a device, each prompt on its own device)
  when they fit; returns the new slots' stream positions (None: free)."""
  shards = sampler.row_shards
  each = len(held) // shards
  blocks = [range(d * each, (d + 1) * each) for d in range(shards)]
  busiest, = _agreed(np.array(
      [max(sum(held[s] is not None for s in b) for b in blocks)]))
  size = 2 ** math.ceil(math.log2(max(busiest, 1)))
  if 4 * size > each:
    return held
  keep = [s for b in blocks for s in sorted(b, key=lambda s: held[s] is None)[:size]]
  slots.keep(keep)
  return [held[s] for s in keep]


def _continuous(sampler: sampling.Sampler, prompts: Iterable[Prompt],
                params: sampling.SamplingParams, **kwargs
                ) -> Iterator[tuple[int, sampling.Generation, int]]:
  """Continuous batching over batch_size prompt slots (sampling.Slots): a
  prompt whose samples have all stopped leaves its slot to the next one in
  the stream. Once the stream is out, the drain runs until a quarter of the
  slots could hold what still runs, moves it there (`_compact`), and so on.
  Yields (stream position, samples, the prompt's first row) as prompts
  finish, out of order. kwargs: `_fill`'s."""
  stream, n = iter(prompts), kwargs["num_samples"]
  held: list[int | None] = [None] * kwargs["batch_size"]  # position per slot
  slots, position, exhausted = None, 0, False
  while True:
    free = [s for s, p in enumerate(held) if p is None]
    new = [] if exhausted else list(itertools.islice(stream, len(free)))
    exhausted = exhausted or len(new) < len(free)
    chosen = _spread(sampler, free, len(new), len(held))
    count, rows_each, longest, any_video, busy, more = _agreed(np.array([
        len(new), _rows_each(sampler, chosen, len(held)),
        max((len(p.token_ids) for p in new), default=1),
        any(p.video is not None for p in new), len(free) < len(held),
        not exhausted]))
    if not count and not busy:
      return
    if count:
      slots = _fill(sampler, slots, new, chosen, position, rows_each, longest,
                    any_video, params, **kwargs)
      for i, s in enumerate(chosen):
        held[s] = position + i
      position += len(new)
    at_most = 0
    if not more:
      held = _compact(sampler, slots, held)
      at_most = len(held) // sampler.row_shards // 4
    out, done = slots.run(drain=not more, at_most=at_most)
    for s, p in enumerate(held):
      if p is not None and done[s * n:(s + 1) * n].all():
        yield p, out, s * n
        held[s] = None


def generate(sampler: sampling.Sampler, prompts: Iterable[Prompt],
             params: sampling.SamplingParams, *,
             tokenizer: transformers.PreTrainedTokenizerBase, batch_size: int,
             num_samples: int = 1, seed: int = 0,
             buckets: Sequence[int] = batching.BUCKETS,
             progress: bool = True, static: bool = False) -> Iterator[list[Sample]]:
  """Yields each prompt's `num_samples` samples, in input order.

  `batch_size` counts prompts per batch on this host; batch_size (and so
  batch_size * num_samples) must divide over the mesh's data axes. Prompts
  run with continuous batching (`_continuous`); with suffixes (a judge's
  orders), or static=True, batch by batch (`_static`). Either way a prompt's
  samples are the same (its uid's keys).
  """
  bar = tqdm.tqdm(unit="tok", desc="generate", disable=not progress,
                  dynamic_ncols=True)
  stream = iter(prompts)
  first = list(itertools.islice(stream, 1))
  static = static or bool(_agreed(np.array([any(p.suffixes for p in first)]))[0])
  engine = _static if static else _continuous
  finished, next_position = {}, 0
  for position, out, row in engine(
      sampler, itertools.chain(first, stream), params, batch_size=batch_size,
      num_samples=num_samples, seed=seed, pad_id=tokenizer.pad_token_id or 0,
      buckets=buckets):
    finished[position] = [_sample(out, r, tokenizer)
                          for r in range(row, row + num_samples)]
    bar.update(sum(s.length for s in finished[position]))
    while next_position in finished:
      yield finished.pop(next_position)
      next_position += 1
      bar.set_postfix(prompts=next_position)
  bar.close()


def next_token_logprobs(sampler: sampling.Sampler, prompts: Iterable[Prompt],
                        token_ids: Sequence[int], *, pad_id: int,
                        batch_size: int, num_suffixes: int = 1,
                        buckets: Sequence[int] = batching.BUCKETS
                        ) -> np.ndarray:
  """log p(token | prompt) [N, len(token_ids)] after each prompt, batched as
  `generate` does; prompts with suffixes give one row per suffix
  (`num_suffixes` each), in order."""
  out = [np.zeros((0, len(token_ids)), np.float32)]
  for b in _batches(sampler, prompts, batch_size, pad_id, buckets,
                    num_suffixes):
    logprobs = sampler.next_token_logprobs(b.rows.prompt_ids,
                                           b.rows.prompt_mask, b.videos,
                                           *b.suffixes)
    out.append(logprobs[:b.real * num_suffixes, list(token_ids)])
  return np.concatenate(out)
