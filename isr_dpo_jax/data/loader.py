"""Grain loaders: records and frames -> fixed-size batches, one shard per host.

A source is a random-access sequence of (record, frames uint8 [T, S, S, 3])
with a `frame_shape` and a `locate(index) -> (path, line)` that names an
item in error reports: `JsonlSource` reads a jsonl file's records and their
videos' frames from a video_cache.Frames (decoded as they are read, or
prepared once). A Loader turns a source into the batches of a task:

  "prompt":     PromptBatch of the first question (generation, evaluation)
  "preference": PreferenceBatch of DPO records (training)
  "sft":        SftBatch of QA conversations (supervised warm start)

Order of operations, all lazy: the indices 0..N-1 are shuffled by `seed` (a
new order every epoch), repeated and padded to whole global batches of
`batch_size * process_count` indices; each host takes its own `batch_size`
of every global batch (host p the p-th block), so the global batches are the
same whatever the number of hosts. Then records are read, tokenised and
collated. A record that fails to load (a video that does not decode, a text
that does not fit) becomes a dummy row (all masks False), is logged and
counted in `loader.report`. The iterator's state (`get_state` / `set_state`)
is a few integers, saved with the training checkpoint, and restoring it
resumes exactly.

`batch_size` is per host. In a multi-process job the hosts agree on the
padded lengths of every batch (the longest any host chose), so that their
rows form one global array. Frames stay uint8 to keep host-to-device
transfers small; video.normalize finishes the preprocessing on the device.
"""
from collections.abc import Sequence
import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from isr_dpo_jax.data import batching
from isr_dpo_jax.data import records
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.data import video
from isr_dpo_jax.data import video_cache

TASKS = ("prompt", "preference", "sft")


class JsonlSource(Sequence):
  """Validated records of a jsonl file; their frames read with each item."""

  def __init__(self, path: str | os.PathLike, kind: str,
               frames: video_cache.Frames,
               max_error_rate: float | None = None):
    """A record whose video is not under `frames.root` is a bad record."""
    self.path = str(path)
    self.report = records.ReadReport()
    self._lines = []
    for line, record in records.iter_jsonl(path, kind, self.report,
                                           frames.root):
      self._lines.append(line)
      self.report.keep(record)
    self.report.check(max_error_rate)
    self.frame_shape = frames.frame_shape
    self._frames = frames

  def __len__(self) -> int:
    return len(self.report.records)

  def locate(self, index: int) -> tuple[str, int]:
    return self.path, self._lines[index]

  def __getitem__(self, index: int) -> tuple[records.Record, np.ndarray]:
    """Raises video.VideoError for a video whose frames cannot be had."""
    record = self.report.records[index]
    return record, self._frames(record["video"])


class Batch(NamedTuple):
  """What a loader yields. Rows whose `ids` entry is None are dummy rows."""
  text: batching.PromptBatch | batching.PreferenceBatch | batching.SftBatch
  frames: np.ndarray  # uint8 [B, T, S, S, 3], zeros in dummy rows
  ids: list[str | None]  # record ids
  errors: list[records.RecordError]  # records skipped in this batch


@dataclasses.dataclass(frozen=True)
class _Example:
  id: str
  tokens: Any
  frames: np.ndarray


def question(record: records.Record) -> str:
  """The prompt of a DPO record or the first question of a conversation."""
  if "prompt" in record:
    return record["prompt"]
  return records.conversation_turns(record["conversations"])[0][0]


def _tokens(task: str, encoder: tokenize.TextEncoder, record):
  if task == "prompt":
    return encoder.prompt(question(record))
  if task == "preference":
    return encoder.preference(record["prompt"], record["chosen"],
                              record["rejected"])
  return encoder.sft(records.conversation_turns(record["conversations"]))


def _host_rows(indices: grain.MapDataset, batch_size: int, process_index: int,
               process_count: int) -> grain.MapDataset:
  """Host `process_index`'s block of `batch_size` in each global batch."""
  def global_position(k):
    step, row = divmod(k, batch_size)
    return (step * process_count + process_index) * batch_size + row
  return grain.MapDataset.range(len(indices) // process_count).map(
      lambda k: indices[global_position(k)])


def _load(index: int, source, task, encoder):
  """An example, a RecordError for a record that fails, None for padding."""
  if index < 0:
    return None
  try:
    record, frames = source[index]
  except video.VideoError as e:
    return records.RecordError(*source.locate(index), "bad_video", str(e))
  try:
    return _Example(record["id"], _tokens(task, encoder, record), frames)
  except records.BadRecord as e:
    return records.RecordError(*source.locate(index), e.reason,
                               f"record {record['id']}: {e.detail}")


def _collate(items, task, batch_size, pad_id, buckets, prompt_offset,
             frame_shape) -> Batch:
  examples = [x if isinstance(x, _Example) else None for x in items]
  collate = {"prompt": batching.collate_prompts,
             "preference": batching.collate_preferences,
             "sft": batching.collate_sft}[task]
  tokens = [None if x is None else x.tokens for x in examples]
  text = collate(tokens, batch_size, pad_id, buckets, prompt_offset)
  frames = np.zeros((batch_size, *frame_shape), np.uint8)
  for row, example in enumerate(examples):
    if example is not None:
      frames[row] = example.frames
  ids = [None if x is None else x.id for x in examples]
  return Batch(text, frames, ids + [None] * (batch_size - len(ids)),
               [x for x in items if isinstance(x, records.RecordError)])


class Loader:
  """Fixed-size batches of one task over a source, for one host."""

  def __init__(
      self,
      source: Sequence,
      task: str,
      encoder: tokenize.TextEncoder,
      batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      num_epochs: int | None = 1,
      buckets: Sequence[int] = batching.BUCKETS,
      process_index: int | None = None,
      process_count: int | None = None,
      num_threads: int = 8,
      worker_count: int = 0,
  ):
    """Builds the grain pipeline; nothing is read until iteration.

    Args:
      source: a random-access sequence of (record, frames), with
        `frame_shape` and `locate` (JsonlSource).
      task: one of TASKS.
      encoder: the text encoder of the model.
      batch_size: rows per batch on this host.
      seed: the shuffling seed, the same on every host.
      shuffle: whether to shuffle (a new order every epoch).
      num_epochs: passes over the data; None repeats forever.
      buckets: length buckets of prompts (after the video tokens) and
        responses.
      process_index: which block of every global batch this host takes;
        default jax.process_index().
      process_count: the number of hosts; default jax.process_count().
      num_threads: threads reading and decoding records.
      worker_count: worker processes; > 0 needs absl flags parsed, as grain
        requires.
    """
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
    self.report = records.ReadReport()
    indices = grain.MapDataset.range(len(source))
    if shuffle:
      indices = indices.shuffle(seed=seed)
    if num_epochs is None:
      indices = indices.repeat()
      self._num_batches = None
    else:
      global_batch = batch_size * process_count
      self._num_batches = math.ceil(len(source) * num_epochs / global_batch)
      padding = [-1] * (self._num_batches * global_batch
                        - len(source) * num_epochs)
      indices = grain.MapDataset.concatenate(
          [indices.repeat(num_epochs), grain.MapDataset.source(padding)])
    indices = _host_rows(indices, batch_size, process_index, process_count)
    load = functools.partial(_load, source=source, task=task, encoder=encoder)
    collate = functools.partial(
        _collate, task=task, batch_size=batch_size,
        pad_id=encoder.tokenizer.pad_token_id, buckets=buckets,
        prompt_offset=encoder.num_video_tokens, frame_shape=source.frame_shape)
    dataset = indices.map(load).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads), allow_nones=True)
    dataset = dataset.batch(batch_size, batch_fn=collate)
    if worker_count:
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=worker_count))
    self.dataset = dataset
    self._pad_id = encoder.tokenizer.pad_token_id

  def __len__(self) -> int:
    """Batches per host (the same on every host)."""
    if self._num_batches is None:
      raise TypeError("an endless loader (num_epochs=None) has no length")
    return self._num_batches

  def __iter__(self) -> "_Iterator":
    return _Iterator(iter(self.dataset), self.report, self._pad_id)


class _Iterator:
  """Grain's iterator, counting loaded and skipped records in a report."""

  def __init__(self, batches, report: records.ReadReport, pad_id: int):
    self._batches = batches
    self._report = report
    self._pad_id = pad_id

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = next(self._batches)
    self._report.count_good(sum(i is not None for i in batch.ids))
    for error in batch.errors:
      self._report.skip(error.path, error.line,
                        records.BadRecord(error.reason, error.detail))
    if jax.process_count() > 1:
      batch = batch._replace(text=_pad_as_every_host(batch.text, self._pad_id))
    return batch

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)


def _pad_as_every_host(text, pad_id: int):
  """`text` padded to the longest length any host chose for each field.

  Prompts are left-padded, responses and targets right-padded (batching's
  contract); ids are padded with `pad_id`, masks with False.
  """
  names = [f.name for f in dataclasses.fields(text)]
  lengths = np.array([getattr(text, name).shape[1] for name in names])
  agreed = multihost_utils.process_allgather(lengths).max(axis=0)
  padded = {}
  for name, length in zip(names, agreed):
    x = getattr(text, name)
    missing = length - x.shape[1]
    side = (missing, 0) if name.startswith("prompt_") else (0, missing)
    fill = pad_id if name.endswith("_ids") else False
    padded[name] = np.pad(x, [(0, 0), side], constant_values=fill)
  return text.replace(**padded)
