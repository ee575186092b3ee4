"""The stages of one ISR-DPO iteration (docs/method.md §1), each resumable.

  responses  two sampled answers per (video, question)       responses.jsonl
  contexts   c_t(V) written while revisiting c_{t-1}(V)       contexts.jsonl
  judgments  the judge's preference, both orders averaged     judgments.jsonl
  pairs      LLaVA-Hound DPO records + reference log-probs    pairs.jsonl

Each stage walks its work in fixed calls, in a fixed order, and appends a
record per item as each call finishes. A restarted stage skips the calls
already written and reruns a partly written one whole (keeping what is there),
so call composition, and therefore every number, equals an uninterrupted run.
The generating stages (responses, contexts) hand the engine
`sampling.batches_per_call` sampling batches per call, so that its slots
refill as answers finish (continuous batching); a record's samples do not
depend on that size, as they draw with keys from the record's id. The judge
calls the model once per `self_judge.batch_size` items.
Items that fail (a video that does not decode, a prompt too long for the
model) go to the iteration's error log with the file, line and cause, and
count as done. Once a stage has skipped more than `data.max_error_rate` of
its items, the run stops: the data, not the model, needs fixing.

On several processes each process works on its contiguous slice of every
batch, and the batch's records and errors are then gathered to every process,
so that all of them hold the whole stage's results; process 0 alone writes
the files. A record's samples draw with keys from its id, so the results do
not depend on the number of processes.
"""
from collections.abc import Callable, Iterable, Sequence
import collections
import dataclasses
import json
import logging
import operator
import pathlib
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from isr_dpo_jax import checkpoint
from isr_dpo_jax import distributed
from isr_dpo_jax import generate
from isr_dpo_jax import judge
from isr_dpo_jax import judges
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.data import loader as loader_lib
from isr_dpo_jax.data import records
from isr_dpo_jax.data import video as video_lib


@dataclasses.dataclass
class Summary:
  """A stage's one-line account: records in, out, dropped by reason, speed.

  `tokens` counts the model's work in this run, of the kind `token_kind`
  names: "generated" (answers, contexts, a generative judge's verdicts) or
  "prompt" (read in one forward pass: the likelihood judge). `resumed` counts
  the items found done on disk when the stage started (a rerun after a kill);
  `seconds` and `tokens` are this run's only.
  """
  stage: str
  records_in: int = 0
  records_out: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  tokens: int = 0
  token_kind: str = "generated"
  resumed: int = 0
  seconds: float = 0.0

  def done_before(self) -> bool:
    """Whether every item was done before this run: it did none of the work."""
    return 0 < self.resumed == self.records_in

  def speed(self, seconds: float) -> str:
    """"123 generated tokens/s" over `seconds`; "" before any token."""
    if not (self.tokens and seconds):
      return ""
    return f"{self.tokens / seconds:.0f} {self.token_kind} tokens/s"

  def line(self) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
    head = f"{self.stage}: {self.records_in} in, {self.records_out} out, dropped: {drops}"
    if self.done_before():
      return f"{head}, resumed (done)"
    parts = [f"{self.resumed} resumed" if self.resumed else "",
             self.speed(self.seconds), f"{self.seconds:.1f}s"]
    return ", ".join([head, *filter(None, parts)])

  def as_dict(self) -> dict:
    return {**vars(self), "dropped": dict(self.dropped)}

  @classmethod
  def from_dict(cls, d: dict) -> "Summary":
    """The Summary of `as_dict`'s output (summary.json's "stages")."""
    return cls(**{**d, "dropped": collections.Counter(d["dropped"])})


def _all_processes(local: list) -> list:
  """Every process's `local` list (JSON values), concatenated in process order."""
  if jax.process_count() == 1:
    return local
  blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(blob.size))
  padded = np.zeros(sizes.max(), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return [x for blob, size in zip(blobs, sizes)
          for x in json.loads(blob[:size].tobytes())]


class _Mirror:
  """Process 0's JsonlAppender as another process holds it: no file writes.

  The other processes compute the same records, so they keep them in step.
  """

  def __init__(self, path, key):
    self.key = key
    self.records = records.load_jsonl(path) if path.exists() else []
    self.done = {key(r) for r in self.records}

  def append(self, record):
    self.done.add(self.key(record))
    self.records.append(dict(record))

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _appender(path, key=operator.itemgetter("id")):
  """A JsonlAppender on process 0 (opening it cuts a partial last line), a
  _Mirror of its file on the others."""
  appender = distributed.write_on_main(
      path, lambda: records.JsonlAppender(path, key))
  return _Mirror(pathlib.Path(path), key) if appender is None else appender


class ErrorLog:
  """The iteration's errors.jsonl: one line per bad item, keyed by stage and id."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self._log = _appender(path, key=lambda r: (r["stage"], r["id"]))

  def done(self, stage: str) -> set[str]:
    return {i for s, i in self._log.done if s == stage}

  def add(self, stage: str, item: dict, reason: str, detail: str) -> None:
    """Logs a bad item once (a rerun batch meets it again)."""
    if (stage, item["id"]) in self._log.done:
      return
    logging.warning("%s: skipping %s (%s:%s): %s: %s", stage, item["id"],
                    item.get("file"), item.get("line"), reason, detail)
    self._log.append(dict(stage=stage, id=item["id"], file=item.get("file"),
                          line=item.get("line"), reason=reason, detail=detail))

  def count(self, stage: str) -> collections.Counter:
    return collections.Counter(r["reason"] for r in self._log.records if r["stage"] == stage)

  def check(self, stage: str, num_items: int, max_error_rate: float | None) -> None:
    """Raises TooManyBadRecords once `stage` skipped over `max_error_rate` of its items.

    Checked as the stage goes: past that count, the stage's final share of
    skipped items cannot stay under the maximum.
    """
    counts = self.count(stage)
    skipped = sum(counts.values())
    if max_error_rate is not None and skipped > max_error_rate * num_items:
      raise records.TooManyBadRecords(
          f"{stage}: {skipped} of {num_items} items skipped "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), more than "
          f"data.max_error_rate={max_error_rate:g} allows; each is in {self.path}")

  def close(self):
    self._log.close()


def run_batches(summary: Summary, path, items: Sequence[dict], batch_size: int,
                work: Callable[[list[dict]], Iterable[dict]], errors: ErrorLog,
                max_error_rate: float | None) -> list[dict]:
  """Appends `work(batch)` records for every fixed batch not yet written.

  A batch (`batch_size` items, one call of `work`) is the unit of resume: one
  partly written is rerun whole. `work` runs on every process and returns the
  whole batch's records. The stage's progress bar (items, and
  `summary.speed`), time and counts go to `summary`. After each batch, the
  items skipped so far are held against `max_error_rate`.
  """
  clock = time.perf_counter()
  with _appender(path) as out:
    skipped = errors.done(summary.stage)
    batches = [items[start:start + batch_size]
               for start in range(0, len(items), batch_size)]
    done = [all(x["id"] in out.done or x["id"] in skipped for x in batch)
            for batch in batches]
    summary.resumed = sum(len(b) for b, d in zip(batches, done) if d)
    with tqdm.tqdm(total=len(items), initial=summary.resumed, desc=summary.stage,
                   unit="item", dynamic_ncols=True,
                   disable=not distributed.is_main_process() or all(done)) as bar:
      for batch, batch_done in zip(batches, done):
        if not batch_done:
          for record in work(batch):
            if record["id"] not in out.done:
              out.append(record)
          bar.update(len(batch))
          bar.set_postfix_str(summary.speed(time.perf_counter() - clock))
        errors.check(summary.stage, len(items), max_error_rate)
    written = list(out.records)
  summary.records_out, summary.dropped = len(written), errors.count(summary.stage)
  summary.seconds = time.perf_counter() - clock
  return written


def _usable(stage: str, batch: list[dict], questions_of: Callable[[dict], list[str]],
            policy: policy_lib.Policy, errors: ErrorLog
            ) -> tuple[list[dict], list[list[str]], list[np.ndarray], bool]:
  """This process's items whose prompts fit and whose video decodes.

  Returns them with their questions (`questions_of(item)`) and pixels. Every
  process logs the failures of all, and learns whether any process kept an
  item (then all of them must run the model, even on no rows). The prompts
  are tokenised here to find those that do not fit; the policy tokenises
  them again when it samples, at a small cost next to sampling.
  """
  kept, questions, pixels, failed = [], [], [], []
  for item in batch[distributed.process_slice(len(batch))]:
    try:
      item_questions = questions_of(item)
      for question in item_questions:
        policy.encoder.prompt(question)
      pixels.append(policy.video(item["video"]))
    except records.BadRecord as e:
      failed.append((item, e.reason, e.detail))
    except video_lib.VideoError as e:
      failed.append((item, "bad_video", str(e)))
    else:
      kept.append(item)
      questions.append(item_questions)
  failed = _all_processes(failed)
  for item, reason, detail in failed:
    errors.add(stage, item, reason, detail)
  return kept, questions, pixels, len(failed) < len(batch)


def _per_call(cfg) -> int:
  """Items per call of a generating stage's work: `sampling.batches_per_call`
  sampling batches, which the engine's slots run through, refilling as
  prompts finish. The call is the stage's unit of resume and of the error-rate
  check, and holds that many items' decoded videos at once."""
  return cfg.sampling.batch_size * cfg.sampling.batches_per_call


def responses(items: list[dict], policy: policy_lib.Policy, cfg, seed: int,
              path, errors: ErrorLog) -> tuple[list[dict], Summary]:
  """Stage 1a: y1, y2 ~ pi_t(. | V, x) for every prompt item."""
  summary = Summary("responses", records_in=len(items))
  params = settings.sampling_params(cfg.sampling.answer)

  def work(batch):
    kept, questions, pixels, any_kept = _usable(
        "responses", batch, lambda x: [x["question"]], policy, errors)
    if not any_kept:
      return []
    uids = [generate.stable_uid("answer", x["id"]) for x in kept]
    samples = policy.sample([q for (q,) in questions], pixels, uids, params,
                            num_samples=2, seed=seed)
    out = _all_processes([dict(id=x["id"], video=x["video"], question=x["question"],
                              responses=[s.text for s in pair],
                              lengths=[s.length for s in pair],
                              logprobs=[s.logprob for s in pair],
                              finish=[s.finish_reason for s in pair])
                         for x, pair in zip(kept, samples)])
    summary.tokens += sum(sum(r["lengths"]) for r in out)
    return out

  return run_batches(summary, path, items, _per_call(cfg), work, errors,
                     cfg.data.max_error_rate), summary


def contexts(videos: list[dict], previous: dict[str, str], policy: policy_lib.Policy,
             cfg, seed: int, path, errors: ErrorLog) -> tuple[list[dict], Summary]:
  """Stage 1b: c_t(V) ~ pi_t(. | V, c_{t-1}(V)), one per video.

  Without retrospection (an ablation) every context is written from scratch.
  """
  summary = Summary("contexts", records_in=len(videos))
  params = settings.sampling_params(cfg.sampling.context)
  prompts = settings.prompts(cfg)

  def before(video: dict) -> str | None:
    return previous.get(video["video"]) if cfg.self_judge.retrospective else None

  def work(batch):
    kept, questions, pixels, any_kept = _usable(
        "contexts", batch, lambda x: [judge.context_question(prompts, before(x))],
        policy, errors)
    if not any_kept:
      return []
    questions = [q for (q,) in questions]
    uids = [generate.stable_uid("context", x["id"]) for x in kept]
    samples = policy.sample(questions, pixels, uids, params, seed=seed)
    out = _all_processes([dict(id=x["id"], video=x["video"], previous=before(x), prompt=q,
                              context=s[0].text, length=s[0].length)
                         for x, q, s in zip(kept, questions, samples)])
    summary.tokens += sum(r["length"] for r in out)
    return out

  return run_batches(summary, path, videos, _per_call(cfg), work, errors,
                     cfg.data.max_error_rate), summary


def judgments(answered: list[dict], context_of: dict[str, str],
              policy: policy_lib.Policy, cfg, seed: int, path, errors: ErrorLog,
              *, ground_truth: pathlib.Path | None = None
              ) -> tuple[list[dict], Summary]:
  """Stage 2: the run's judge (self_judge.mode) weighs y1 against y2; keep or drop.

  The judge gives P(y1 better) per order, or why it gives no verdict;
  averaging the orders and the decision are the same for every judge. Every
  judge's items must fit the judge prompts of both orders (judges.Pair.orders),
  so that all judges see the same pairs. `ground_truth` is the synthetic
  world's file, for self_judge.mode="ground_truth".
  """
  judge_fn = judges.make(cfg, policy, seed, ground_truth)
  summary = Summary("judgments", records_in=len(answered),
                    token_kind=judge_fn.token_kind)
  prompts = settings.prompts(cfg)

  def context(x: dict) -> str | None:
    return context_of.get(x["video"]) if cfg.self_judge.use_context else None

  def orders(x: dict) -> list[str]:
    return list(judge.judge_questions(prompts, x["question"], *x["responses"], context(x)))

  def work(batch):
    kept, questions, pixels, any_kept = _usable("judgments", batch, orders, policy, errors)
    if not any_kept:
      return []
    verdicts = judge_fn([judges.Pair(x["id"], x["video"], x["question"], tuple(x["responses"]),
                                     context(x), tuple(q), p)
                         for x, q, p in zip(kept, questions, pixels)])
    summary.tokens += sum(_all_processes([verdicts.tokens]))
    p_y1, agree = judge.average_orders(verdicts.p_y1_Nx2,
                                       [r is None for r in verdicts.no_verdict])
    out = []
    for i, x in enumerate(kept):
      decision = judge.decide(*x["responses"], float(p_y1[i]), bool(agree[i]),
                              cfg.self_judge.threshold, verdicts.no_verdict[i],
                              cfg.self_judge.require_agreement)
      out.append(dict(id=x["id"], p_y1=float(p_y1[i]), agree=bool(agree[i]),
                      confidence=decision.confidence, winner=decision.winner,
                      reason=decision.reason, raw=verdicts.evidence[i]))
    return _all_processes(out)

  out = run_batches(summary, path, answered, cfg.self_judge.batch_size, work, errors,
                    cfg.data.max_error_rate)
  summary.records_out = sum(r["winner"] is not None for r in out)  # pairs kept
  summary.dropped += collections.Counter(r["reason"] for r in out if r["reason"])
  return out, summary


def preference_records(answered: list[dict], judged: list[dict]) -> list[dict]:
  """Kept judgments as LLaVA-Hound DPO records (+ confidence and lengths)."""
  by_id = {r["id"]: r for r in answered}
  pairs = []
  for j in judged:
    if j["winner"] is None:
      continue
    a = by_id[j["id"]]
    w, l = j["winner"], 1 - j["winner"]
    pairs.append(dict(id=a["id"], video=a["video"], prompt=a["question"],
                      chosen=a["responses"][w], rejected=a["responses"][l],
                      chosen_length=a["lengths"][w], rejected_length=a["lengths"][l],
                      confidence=j["confidence"]))
  return pairs


def _pair_loader(pairs_path, policy: policy_lib.Policy, batch_size: int, *,
                 shuffle: bool, num_epochs: int | None, seed: int = 0):
  source = loader_lib.JsonlSource(pairs_path, "dpo", policy.frames)
  return loader_lib.Loader(source, "preference", policy.encoder,
                           distributed.per_process(batch_size, "train.batch_size"),
                           seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                           buckets=policy.buckets)


def reference_logps(pairs: list[dict], path, policy: policy_lib.Policy,
                    trainer: train.Trainer, reference_params, batch_size: int,
                    errors: ErrorLog) -> list[dict]:
  """Stage 3: log pi_ref(y_w), log pi_ref(y_l), computed once, stored with the pairs.

  Training then needs no reference model resident. Pairs are written first
  without them (the loader reads the file), then again with them, atomically.
  A pair that cannot be tokenised (too long, say) is logged and left out.
  Each process computes its rows of every batch; process 0 writes them all.
  """
  if pairs and all("reference_chosen_logp" in p for p in pairs):
    return pairs
  distributed.write_on_main(path, lambda: records.write_jsonl(path, pairs))
  logps = []
  loader = _pair_loader(path, policy, batch_size, shuffle=False, num_epochs=1)
  for batch in loader:
    chosen, rejected = trainer.reference_logps(reference_params, batch.text, batch.frames)
    logps += [(pair_id, float(chosen[row]), float(rejected[row]))
              for row, pair_id in enumerate(batch.ids) if pair_id is not None]
  logps = {i: (c, r) for i, c, r in _all_processes(logps)}
  for error in _all_processes([dataclasses.asdict(e) for e in loader.report.errors]):
    item = dict(pairs[error["line"] - 1], file=error["path"], line=error["line"])
    errors.add("pairs", item, error["reason"], error["detail"])
  pairs = [dict(p, reference_chosen_logp=logps[p["id"]][0],
                reference_rejected_logp=logps[p["id"]][1])
           for p in pairs if p["id"] in logps]
  distributed.write_on_main(path, lambda: records.write_jsonl(path, pairs))
  return pairs


def dpo(pairs: list[dict], path, policy: policy_lib.Policy, trainer: train.Trainer,
        num_steps: int, cfg, seed: int, workdir) -> train.TrainState:
  """Stage 4: DPO from pi_t on the pairs; resumes from the last train checkpoint."""
  reference = {p["id"]: (p["reference_chosen_logp"], p["reference_rejected_logp"])
               for p in pairs}
  batches = iter(_pair_loader(path, policy, cfg.train.batch_size, shuffle=True,
                              num_epochs=None, seed=seed))

  def update(state, batch):
    ref = np.array([reference.get(i, (0.0, 0.0)) for i in batch.ids], np.float32)
    return trainer.dpo_update(state, batch.text, batch.frames, ref[:, 0], ref[:, 1])

  with checkpoint.Checkpointer(workdir / "checkpoints",
                               save_interval_steps=cfg.train.checkpoint_every) as ckpt, \
       metrics_lib.MetricsWriter(workdir / "train") as writer:
    state = train.restore_or_init(trainer, policy.model, ckpt, batches, seed)
    return train.fit(update, state, batches, num_steps=num_steps, checkpointer=ckpt,
                     writer=writer, desc="dpo")
