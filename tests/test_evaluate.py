"""End-to-end evaluation with a fake answer function and a local-model judge."""
import filecmp
import json
import logging
from pathlib import Path
import re
import statistics
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import pytest

from isr_dpo_jax import defaults
from isr_dpo_jax import evaluate
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COLORS = ("red", "green", "blue")
N = 12  # every (color, answer style) pair once


def _color(i):
  return COLORS[i % 3]


@pytest.fixture
def split(tmp_path):
  """A synthetic test split: "What color is the ball?", answers known."""
  rows = [{"id": f"s{i}", "video": f"synthetic/{i:04d}.mp4",
           "caption": f"A {_color(i)} ball rolls to the left.",
           "conversations": [
               {"from": "human", "value": "<video>\nWhat color is the ball?"},
               {"from": "gpt", "value": _color(i)}]} for i in range(N)]
  path = tmp_path / "synth.qa.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _prediction(i):
  return [f"The ball is {_color(i)}.", "It is blue.",
          "Let me think. " * 20 + _color(i), "I don't know."][i % 4]


def answer_fn(records):
  return [_prediction(int(r.id[1:])) for r in records]


def local_judge(prompts):
  """Stands in for a local judge model: 4 when the prediction holds the
  answer, else 2; no score for long answers about green balls."""
  replies = []
  for prompt in prompts:
    answer = re.search(r"\*\*Ground Truth Answer\*\*: (.*)\n", prompt)[1]
    prediction = re.search(r"\*\*Model Predicted Answer\*\*: (.*)\n", prompt)[1]
    if prediction.startswith("Let me think") and answer == "green":
      replies.append("Explanation: I am not sure.")
    else:
      replies.append(f"Explanation: ok.\nScore: {4 if answer in prediction else 2}")
  return replies


def _expected_score(i):
  return [4, 4 if _color(i) == "blue" else 2,
          None if _color(i) == "green" else 4, 2][i % 4]


def _config(split, scoring="judge"):
  config = defaults.get_config().eval
  config.update(test_sets=[str(split)], scoring=scoring, batch_size=4)
  config.judge.batch_size = 4
  return config


def test_judged_evaluation_writes_the_table(split, tmp_path):
  workdir = tmp_path / "eval"
  (row,) = evaluate.evaluate(_config(split), workdir, answer_fn,
                             judge=local_judge)

  scores = [s for s in map(_expected_score, range(N)) if s is not None]
  assert (row.n, row.scored, row.parse_failures, row.unjudged) == (
      N, len(scores), N - len(scores), 0)
  assert row.accuracy == pytest.approx(sum(s >= 3 for s in scores) /
                                       len(scores))
  assert row.score == pytest.approx(statistics.fmean(scores))
  words = [len(_prediction(i).split()) for i in range(N)]
  p90 = statistics.quantiles(words, n=10, method="inclusive")[-1]
  assert (row.words.mean, row.words.median, row.words.p90) == pytest.approx(
      (statistics.fmean(words), statistics.median(words), p90))

  table = (workdir / "results.md").read_text()
  assert (f"| synth | caption_grounded | {N} | 0 | {row.accuracy * 100:.2f} "
          f"| {row.score:.2f} | {N - len(scores)} | 0 | {row.words.mean:.1f} / "
          f"{row.words.median:.1f} / {p90:.1f} | - |") in table
  (saved,) = [json.loads(line) for line in
              (workdir / "results.jsonl").read_text().splitlines()]
  assert saved["accuracy"] == row.accuracy and saved["words"]["p90"] == p90


def test_a_record_without_its_video_is_named_skipped_and_never_judged(
    split, tmp_path, caplog):
  def answer_fn_without_s5(batch):
    return [records.BadRecord("bad_video", f"record {r.id}: no such file")
            if r.id == "s5" else _prediction(int(r.id[1:])) for r in batch]

  workdir = tmp_path / "eval"
  with caplog.at_level(logging.WARNING):
    (row,) = evaluate.evaluate(_config(split), workdir, answer_fn_without_s5,
                               judge=local_judge)

  assert f"{split}:6: bad_video: record s5: no such file" in caplog.text
  assert (row.n, row.skipped, row.scored + row.parse_failures) == (N - 1, 1,
                                                                  N - 1)
  others = {f"s{i}" for i in range(N)} - {"s5"}
  for name in ("predictions", "judgments_caption_grounded"):
    assert {json.loads(line)["id"] for line in (
        workdir / "synth" / f"{name}.jsonl").open()} == others
  assert f"| synth | caption_grounded | {N - 1} | 1 | " in (
      workdir / "results.md").read_text()
  (error,) = [json.loads(line) for line in
              (workdir / "synth" / "errors.jsonl").read_text().splitlines()]
  assert (error["path"], error["line"], error["reason"]) == (
      str(split), 6, "bad_video")


def test_a_local_judge_reads_the_protocols_system_message_first():
  class EchoPolicy:  # completes a text with itself
    def complete(self, texts, params):
      assert params.temperature == 0.0
      return list(texts)

  judge = evaluate.local_judge(EchoPolicy(), max_new_tokens=8, system="Fair.")
  assert judge(["Q1", "Q2"]) == ["Fair.\n\nQ1", "Fair.\n\nQ2"]
  assert evaluate.local_judge(EchoPolicy(), max_new_tokens=8)(["Q1"]) == ["Q1"]


def test_command_line_picks_the_protocol_and_the_test_sets():
  argv = ["isr-dpo", f"--config={CONFIGS / 'video_llava_7b.py'}",
          "--config.eval.protocol=video_chatgpt",
          "--config.eval.test_sets=('msvd_official', 'tgif_official')"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.eval.protocol == "video_chatgpt"
  assert list(flag_values.config.eval.test_sets) == ["msvd_official",
                                                     "tgif_official"]


def test_synthetic_world_split_scored_by_its_checker(tmp_path):
  paths = scenes.write_world(tmp_path / "world", {"test": 3}, size=16)
  config = defaults.get_config().eval
  config.update(test_sets=[str(paths["test_qa"])], scoring="match")

  def half_right(records):  # right on the even questions of each clip
    return [f"It is {r.answer}." if int(r.id.rsplit("_", 1)[1]) % 2 == 0
            else "I do not know." for r in records]

  (row,) = evaluate.evaluate(config, tmp_path / "eval", half_right,
                             checker=scenes.answer_is_correct)
  ids = [json.loads(line)["id"] for line in
         paths["test_qa"].read_text().splitlines()]
  right = [int(i.rsplit("_", 1)[1]) % 2 == 0 for i in ids]
  assert row.n == len(ids) > 0
  assert row.accuracy == pytest.approx(sum(right) / len(ids))
  assert (row.score, row.parse_failures, row.unjudged) == (None, 0, 0)
  assert not list((tmp_path / "eval" / "test_qa").glob("judgments*"))
  assert "| test_qa | match |" in (tmp_path / "eval" / "results.md").read_text()


class _Killed(Exception):
  pass


def _dies_after(fn, calls, seen):
  """`fn` that records what it is asked, and dies on call number `calls`+1."""
  count = 0

  def wrapped(batch):
    nonlocal count
    count += 1
    if count > calls:
      raise _Killed
    seen.extend(batch)
    return fn(batch)
  return wrapped


_RUN_UNTIL_KILLED = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_evaluate as t
from isr_dpo_jax import evaluate
batches = 0
def answer_fn(batch):
  global batches
  batches += 1
  if batches > 2:
    time.sleep(600)  # the parent kills us here
  return t.answer_fn(batch)
evaluate.evaluate(t._config(Path({split!r})), {workdir!r}, answer_fn,
                  judge=t.local_judge)
"""


def _run_until_killed(split, workdir, lines):
  """Runs an evaluation in a process, and kill -9 it after `lines` answers."""
  script = _RUN_UNTIL_KILLED.format(tests=str(Path(__file__).parent),
                                    split=str(split), workdir=str(workdir))
  process = subprocess.Popen([sys.executable, "-c", script])
  predictions = workdir / "synth" / "predictions.jsonl"
  deadline = time.monotonic() + 60
  while not (predictions.exists() and
             predictions.read_text().count("\n") >= lines):
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.02)
  process.kill()
  process.wait()


def test_resumed_run_after_kills_writes_the_same_table(split, tmp_path):
  config = _config(split)
  evaluate.evaluate(config, tmp_path / "once", answer_fn, judge=local_judge)

  workdir = tmp_path / "killed"
  _run_until_killed(split, workdir, lines=8)  # killed while answering
  with (workdir / "synth" / "predictions.jsonl").open("a") as f:
    f.write('{"id": "s8", "predic')  # as if killed mid-write
  answered, judged = [], []
  with pytest.raises(_Killed):  # killed while judging, mid-write
    evaluate.evaluate(config, workdir, _dies_after(answer_fn, 9, answered),
                      judge=_dies_after(local_judge, 1, judged))
  with (workdir / "synth" / "judgments_caption_grounded.jsonl").open("a") as f:
    f.write('{"id": "s4", "re')
  rows = evaluate.evaluate(config, workdir, _dies_after(answer_fn, 9, answered),
                           judge=_dies_after(local_judge, 9, judged))

  # The killed process answered s0-s7; the rest was answered once, judged once.
  assert [r.id for r in answered] == [f"s{i}" for i in range(8, N)]
  assert len(set(judged)) == len(judged) == N
  for name in ("results.md", "results.jsonl"):
    assert filecmp.cmp(tmp_path / "once" / name, workdir / name, shallow=False)
  assert rows[0].n == N
