"""VideoQA evaluation: `isr-dpo eval --config=... --workdir=...`.

Answers, judged or matched, into a results table.

Per test set, predictions and judgments are appended to
`{workdir}/{test set}/predictions.jsonl` and `judgments_{protocol}.jsonl` as
they come, keyed by record id, so a killed run picks up where it stopped; the
table goes to `{workdir}/results.md` and `results.jsonl`. Answers come from
`answer_fn(records) -> predictions` (greedy decoding by the generation engine);
a record it cannot answer (its video does not decode) is skipped like a bad
test line: logged as file:line, listed in `{test set}/errors.jsonl`, counted in
the table's Skipped column, never judged.
Scores come from a judge (any `eval.judge_client.Judge`) under the protocol
of config.eval.protocol (`eval.protocols`: ISR-DPO's caption-grounded 1-5
scores, or the Video-ChatGPT-style yes/no of LLaVA-Hound-DPO's published
table), or, for test sets whose answers can be checked (the synthetic
world's), from a checker without any judge.
"""
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ml_collections import config_dict

from isr_dpo_jax import bootstrap
from isr_dpo_jax import generate
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import sampling
from isr_dpo_jax import settings
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes
from isr_dpo_jax.data import video as video_lib
from isr_dpo_jax.eval import judge_client
from isr_dpo_jax.eval import protocols
from isr_dpo_jax.eval import scoring
from isr_dpo_jax.eval import tables
from isr_dpo_jax.eval import test_sets

# One answer per record, or the BadRecord that says why there is none.
AnswerFn = Callable[[Sequence[test_sets.QARecord]],
                    Sequence[str | records.BadRecord]]


def main(config: config_dict.ConfigDict, workdir: str) -> None:
  """Evaluates the config's policy: its pi_0, or the params in eval.params_dir.

  Exits non-zero, with one line, when the judge endpoint takes no connection
  (before any answering) or when records are left unjudged (after the table).
  """
  logging.getLogger().setLevel(logging.INFO)
  workdir = Path(workdir)
  setup = bootstrap.prepare(config, workdir)
  mesh = parallel.make_mesh(dict(config.mesh))
  policy = policy_lib.Policy.from_config(config, setup, mesh,
                                         config.eval.get("params_dir") or None)
  judge = None
  if config.eval.scoring == "judge" and config.eval.judge.local:
    judge_policy = policy if config.eval.judge.local == "policy" else (
        policy_lib.Policy.load(
            config.eval.judge.local, mesh=mesh, template=config.data.template,
            video_root=setup.video_root, batch_size=config.sampling.batch_size,
            buckets=config.sampling.buckets))
    judge = local_judge(judge_policy, config.eval.judge.max_new_tokens,
                        protocols.get(config.eval.protocol).system)
  try:
    rows = evaluate_policy(policy, config, setup.test_sets, workdir, judge=judge)
  except judge_client.JudgeUnreachable as e:
    raise SystemExit(f"isr-dpo eval: {e} (config.eval.judge.base_url, else "
                     "OPENAI_BASE_URL)") from None
  print((workdir / "results.md").read_text())
  if unjudged := sum(row["unjudged"] for row in rows):
    raise SystemExit(
        f"isr-dpo eval: {unjudged} of {sum(row['n'] for row in rows)} answered "
        "records are unjudged (the judge gave no reply, as logged above); "
        "rerun the same command to judge only those")


def local_judge(policy: policy_lib.Policy, max_new_tokens: int,
                system: str | None = None) -> judge_client.Judge:
  """A judge run by this project: a local checkpoint writes the verdicts, greedily.

  A protocol's `system` message goes in front of each prompt, as the
  checkpoint's template has a system text of its own.
  """
  greedy = sampling.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
  prefix = f"{system}\n\n" if system else ""
  return lambda prompts: policy.complete([prefix + p for p in prompts], greedy)


def evaluate_policy(policy: policy_lib.Policy, config: config_dict.ConfigDict,
                    test_sets: Sequence[str], workdir: str | os.PathLike[str], *,
                    judge: judge_client.Judge | None = None) -> list[dict]:
  """Greedy answers of `policy` on `test_sets`, scored as config.eval says.

  A record whose video does not decode is skipped (reason "bad_video").
  """
  greedy = sampling.SamplingParams(
      temperature=0.0, max_new_tokens=config.sampling.answer.max_new_tokens)

  def answer_fn(batch):
    answers, pixels, ok = {}, [], []
    for r in batch:
      try:
        pixels.append(policy.video(r.video))
        ok.append(r)
      except video_lib.VideoError as e:
        answers[r.id] = records.BadRecord("bad_video", f"record {r.id}: {e}")
    uids = [generate.stable_uid("eval", r.id) for r in ok]
    samples = policy.sample([r.question for r in ok], pixels, uids, greedy) if ok else []
    answers.update((r.id, s[0].text) for r, s in zip(ok, samples))
    return [answers[r.id] for r in batch]

  eval_config = config_dict.ConfigDict(config.eval)
  eval_config.test_sets = list(test_sets)
  checker = (scoring.keyword_match if config.get("world") is None
             else scenes.answer_is_correct)
  rows = evaluate(eval_config, workdir, answer_fn, judge=judge, checker=checker,
                  tokenizer=policy.tokenizer)
  return [dataclasses.asdict(row) for row in rows]


def openai_judge(config: config_dict.ConfigDict,
                 workdir: str | os.PathLike[str]) -> judge_client.OpenAIJudge:
  """The endpoint judge of an eval config's `judge` (config.eval.judge), caching
  under `workdir` by default.

  It sends the system message of `config.protocol`.
  """
  c = config.judge
  return judge_client.OpenAIJudge(
      model=c.model, base_url=c.base_url, api_key=c.api_key,
      cache_path=c.cache_path or Path(workdir) / "judge_cache.jsonl",
      concurrency=c.concurrency, max_retries=c.max_retries,
      timeout_s=c.timeout_s, backoff_s=c.backoff_s,
      system=protocols.get(config.protocol).system)


def evaluate(config: config_dict.ConfigDict, workdir: str | os.PathLike[str],
             answer_fn: AnswerFn, *, judge: judge_client.Judge | None = None,
             checker: scoring.Checker = scoring.keyword_match,
             tokenizer=None) -> list[tables.ResultRow]:
  """Evaluates every test set of `config` (a run's config.eval), then writes
  the results table.

  With config.scoring == "judge", `judge` (a local model, say) replaces the
  endpoint judge of config.judge (which must take connections before any
  answering starts: judge_client.JudgeUnreachable), and is given the user messages of
  config.protocol (its system message is the judge's to add); with "match",
  `checker` scores answers.
  """
  if config.scoring not in settings.SCORINGS:
    raise ValueError(f"scoring must be one of {settings.SCORINGS}: {config.scoring!r}")
  protocol = protocols.get(config.protocol)
  with contextlib.ExitStack() as stack:
    if config.scoring == "match":
      judge = None
    elif judge is None:
      judge = stack.enter_context(openai_judge(config, workdir))
      judge.check_reachable()  # before hours of answering, not after
    rows = []
    for name in config.test_sets:
      test_set = test_sets.load_test_set(
          name, config.test_root, config.max_error_rate,
          with_caption=protocol.needs_caption)
      rows.append(evaluate_test_set(
          test_set, Path(workdir) / test_set.name, answer_fn, judge=judge,
          protocol=protocol, checker=checker, batch_size=config.batch_size,
          judge_batch_size=config.judge.batch_size, tokenizer=tokenizer))
    if stats := getattr(judge, "stats", None):
      logging.info("judge: %s", stats)
  for path in tables.write_tables(rows, workdir):
    logging.info("wrote %s", path)
  return rows


def evaluate_test_set(test_set: test_sets.TestSet,
                      workdir: str | os.PathLike[str], answer_fn: AnswerFn, *,
                      judge: judge_client.Judge | None = None,
                      protocol: protocols.Protocol = protocols.CAPTION_GROUNDED,
                      checker: scoring.Checker = scoring.keyword_match,
                      batch_size: int = 32, judge_batch_size: int = 64,
                      tokenizer=None) -> tables.ResultRow:
  """Answers, then judges (or checks, without a judge) one test set.

  The test set's bad lines and the records answer_fn could not answer are
  listed in `errors.jsonl` and counted as skipped.
  """
  workdir = Path(workdir)
  with records.JsonlAppender(workdir / "predictions.jsonl") as log:
    unanswered = answer_records(test_set, answer_fn, log, batch_size)
    predictions = {row["id"]: row["prediction"] for row in log.records}
  answered = [r for r in test_set.records if r.id in predictions]
  skipped = records.ReadReport(errors=test_set.errors + unanswered)
  records.write_errors(workdir / "errors.jsonl", skipped)
  texts = [predictions[r.id] for r in answered]
  if judge is None:
    summary = scoring.ScoreSummary(
        accuracy=scoring.match_accuracy(answered, texts, checker),
        mean_score=None, parsed=len(texts), parse_failures=0)
    unjudged = 0
  else:
    path = workdir / f"judgments_{protocol.name}.jsonl"
    with records.JsonlAppender(path) as log:
      judge_records(answered, predictions, judge, protocol, log,
                    judge_batch_size)
      verdicts = {row["id"]: protocols.Verdict(row["correct"], row["score"])
                  for row in log.records}
    summary = scoring.summarize_verdicts(
        [verdicts[r.id] for r in answered if r.id in verdicts])
    unjudged = sum(r.id not in verdicts for r in answered)
  return tables.ResultRow(
      test_set=test_set.name,
      protocol="match" if judge is None else protocol.name,
      n=len(answered), skipped=len(skipped.errors),
      accuracy=summary.accuracy, score=summary.mean_score,
      scored=summary.parsed, parse_failures=summary.parse_failures,
      unjudged=unjudged,
      words=scoring.length_stats(scoring.word_counts(texts)),
      tokens=(scoring.length_stats(scoring.token_counts(texts, tokenizer))
              if tokenizer is not None else None))


def answer_records(test_set: test_sets.TestSet, answer_fn: AnswerFn,
                   log: records.JsonlAppender,
                   batch_size: int) -> list[records.RecordError]:
  """Answers the records not yet in `log`, saving batch by batch.

  Returns the records answer_fn gave a BadRecord for, each logged as
  file:line; they stay out of `log`, so a rerun tries them again.
  """
  todo = [r for r in test_set.records if r.id not in log.done]
  logging.info("%s: %d of %d records to answer", log.path, len(todo),
               len(test_set.records))
  unanswered = records.ReadReport()
  for batch in _batches(todo, batch_size):
    answers = answer_fn(batch)
    if len(answers) != len(batch) or not all(
        isinstance(a, str | records.BadRecord) for a in answers):
      raise ValueError(f"answer_fn must give {len(batch)} strings or "
                       f"BadRecords, one per record, not {answers!r:.200}")
    for record, answer in zip(batch, answers):
      if isinstance(answer, records.BadRecord):
        unanswered.skip(test_set.path, record.line, answer)
      else:
        log.append({"id": record.id, "prediction": answer})
    logging.info("%s: %d records answered", log.path, len(log.done))
  return unanswered.errors


def judge_records(test_records: Sequence[test_sets.QARecord],
                  predictions: dict[str, str], judge: judge_client.Judge,
                  protocol: protocols.Protocol, log: records.JsonlAppender,
                  batch_size: int) -> None:
  """Judges the records not yet in `log`, batch by batch.

  Records the judge could not answer are left out, to be tried again on the
  next run; replies the protocol cannot read are kept, with None for what
  they lack.
  """
  todo = [r for r in test_records if r.id not in log.done]
  logging.info("%s: %d of %d records to judge", log.path, len(todo),
               len(test_records))
  for batch in _batches(todo, batch_size):
    replies = judge([protocol.user_message(r, predictions[r.id])
                     for r in batch])
    for record, reply in zip(batch, replies, strict=True):
      if reply is not None:
        verdict = protocol.parse(reply)
        log.append({"id": record.id, "reply": reply,
                    "correct": verdict.correct, "score": verdict.score})
    logging.info("%s: %d records judged", log.path, len(log.done))


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
  for start in range(0, len(items), size):
    yield items[start:start + size]
