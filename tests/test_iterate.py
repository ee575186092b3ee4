"""The ISR-DPO loop end to end on configs/smoke.py: artifacts, resume, bad input."""
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flax import nnx

import conftest
from isr_dpo_jax import checkpoint
from isr_dpo_jax import iterate
from isr_dpo_jax import models
from isr_dpo_jax.world import build

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  return conftest.load_config("smoke", **overrides)


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def policy_params(workdir, t=None):
  """pi_0 (t None) or the policy saved by iteration t, as a pure dict."""
  model = models.load_pretrained(workdir / "init")
  if t is not None:
    checkpoint.load_params(model, workdir / f"iter_{t}" / "policy")
  return nnx.to_pure_dict(nnx.state(model))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  summaries = iterate.run(smoke_config(), workdir)
  return workdir, summaries


def test_two_iterations_write_every_artifact(smoke_run):
  workdir, summaries = smoke_run
  assert [s["iteration"] for s in summaries] == [0, 1]
  for t in (0, 1):
    it = workdir / f"iter_{t}"
    responses = read_jsonl(it / "responses.jsonl")
    assert len(responses) == 16
    assert all(len(r["responses"]) == 2 and len(r["lengths"]) == 2 for r in responses)
    judged = read_jsonl(it / "judgments.jsonl")
    assert {j["id"] for j in judged} == {r["id"] for r in responses}
    for j in judged:
      assert (j["winner"] is None) == (j["reason"] is not None)
      assert 0.5 <= j["confidence"] <= 1.0
    pairs = read_jsonl(it / "pairs.jsonl")
    assert len(pairs) == summaries[t]["pairs"] == sum(j["winner"] is not None for j in judged)
    for p in pairs:
      assert {"id", "video", "prompt", "chosen", "rejected", "reference_chosen_logp",
              "reference_rejected_logp", "confidence"} <= set(p)
      assert p["chosen"] != p["rejected"] and p["reference_chosen_logp"] <= 0
    assert (it / "policy").is_dir() and (it / "summary.json").exists()
  assert (workdir / "report.md").read_text().startswith("# ISR-DPO run report")
  assert (workdir / "report.png").stat().st_size > 0


def test_every_file_gets_the_mode_of_the_umask(smoke_run):
  workdir, _ = smoke_run
  umask = os.umask(0)
  os.umask(umask)
  modes = {p.relative_to(workdir): stat.S_IMODE(p.stat().st_mode)
           for p in workdir.rglob("*") if p.is_file()}
  assert {p: m for p, m in modes.items() if m != 0o666 & ~umask} == {}


def test_contexts_are_retrospective(smoke_run):
  workdir, _ = smoke_run
  first = {c["video"]: c for c in read_jsonl(workdir / "iter_0" / "contexts.jsonl")}
  second = read_jsonl(workdir / "iter_1" / "contexts.jsonl")
  assert all(c["previous"] is None for c in first.values())
  for c in second:
    assert c["previous"] == first[c["video"]]["context"]
    assert f"written earlier: {c['previous']}\n" in c["prompt"]


def test_policy_changes_across_iterations(smoke_run):
  workdir, summaries = smoke_run
  assert all(s["pairs"] > 0 for s in summaries)
  pi_0, pi_1, pi_2 = (policy_params(workdir, t) for t in (None, 0, 1))
  llm = lambda p: np.asarray(p["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"])
  tower = lambda p: np.asarray(p["video_tower"]["patch_embedding"]["kernel"])
  assert np.abs(llm(pi_1) - llm(pi_0)).max() > 0
  assert np.abs(llm(pi_2) - llm(pi_1)).max() > 0
  np.testing.assert_array_equal(tower(pi_2), tower(pi_0))  # frozen by default


def _cli(workdir, *overrides) -> list[str]:
  return [sys.executable, "-m", "isr_dpo_jax.cli", "iterate",
          f"--config={REPO / 'configs' / 'smoke.py'}", f"--workdir={workdir}",
          *overrides]


def _lines(path: pathlib.Path) -> int:
  return path.read_text().count("\n") if path.exists() else 0


def _run_until(command, condition, timeout=300) -> bool:
  """Runs `command`; kill -9 once `condition()` holds. True if it was killed."""
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.monotonic() + timeout
  while proc.poll() is None and time.monotonic() < deadline:
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.02)
  if proc.poll() is None:
    proc.kill()
    raise TimeoutError(f"{command} ran past {timeout}s")
  assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
  return False


def test_killed_run_resumes_to_the_same_pairs_and_parameters(smoke_run, tmp_path):
  baseline, _ = smoke_run
  it = tmp_path / "iter_0"
  command = _cli(tmp_path, "--config.train.checkpoint_every=1")
  kill_points = {
      "generation": lambda: _lines(it / "responses.jsonl") >= 8,
      "judging": lambda: _lines(it / "judgments.jsonl") >= 8,
      "training": lambda: any((it / "checkpoints").glob("1")),
  }
  killed = {name: _run_until(command, cond) for name, cond in kill_points.items()}
  assert all(killed.values()), killed  # each run died where it was meant to
  assert not _run_until(command, lambda: False)  # the last run finishes
  for t in (0, 1):
    for name in ("responses.jsonl", "contexts.jsonl", "judgments.jsonl", "pairs.jsonl"):
      assert (read_jsonl(tmp_path / f"iter_{t}" / name)
              == read_jsonl(baseline / f"iter_{t}" / name)), (t, name)
  steps = lambda path: [row["step"] for row in read_jsonl(path)]
  assert steps(tmp_path / "metrics.jsonl") == [0, 1]
  for t in (0, 1):  # each step once: none lost at the kill, none repeated after
    train_metrics = pathlib.Path(f"iter_{t}", "train", "metrics.jsonl")
    assert steps(tmp_path / train_metrics) == steps(baseline / train_metrics), t
  resumed, uninterrupted = policy_params(tmp_path, 1), policy_params(baseline, 1)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_iteration_seeds_never_collide():
  seeds = {iterate.iteration_seed(seed, t) for seed in range(3) for t in range(1000)}
  assert len(seeds) == 3 * 1000


def test_a_moved_workdir_finds_its_world(tmp_path):
  world = smoke_config().world
  written = build.write_world(world, tmp_path / "run" / "world")
  (tmp_path / "run").rename(tmp_path / "moved")
  found = build.write_world(world, tmp_path / "moved" / "world")
  assert found.keys() == written.keys()
  for path in found.values():
    assert path.exists() and (tmp_path / "moved") in path.parents


def test_duplicate_ids_and_empty_questions_are_bad_prompts(tmp_path):
  (tmp_path / "videos" / "v").mkdir(parents=True)
  qa = lambda id_, question: {"id": id_, "video": "v", "conversations": [
      {"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}]}
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in [
      qa("a", "<video>\nWhat is it?"), qa("b", "<video>\n  "), qa("a", "Why?"),
      qa(1, "How?"), qa("1", "<video>Where?"), qa("c", "")]))
  items, skipped = iterate.read_prompts(prompts, tmp_path / "videos", 0.7, tmp_path)
  assert [(x["id"], x["line"], x["question"]) for x in items] == [
      ("a", 1, "What is it?"), ("1", 4, "How?")]
  errors = read_jsonl(tmp_path / "prompt_errors.jsonl")
  assert [(e["path"], e["line"], e["reason"]) for e in errors] == [
      (str(prompts), 2, "empty_question"), (str(prompts), 3, "duplicate_id"),
      (str(prompts), 5, "duplicate_id"), (str(prompts), 6, "empty_question")]
  assert errors[1]["detail"] == "id 'a' is also on line 1"
  assert skipped == {"empty_question": 2, "duplicate_id": 2}


def test_bad_prompts_are_skipped_named_and_counted(tmp_path):
  run = tmp_path / "run"
  world = build.write_world(smoke_config().world, run / "world")
  videos = world["video_root"]
  (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
  good = world["train_qa"].read_text().splitlines()[:6]
  record = json.loads(good[0])
  bad = [
      b"{not json",
      b'{"id": "\xff\xfe"}',
      json.dumps({"id": "no_conversations", "video": record["video"]}).encode(),
      json.dumps(dict(record, id="missing_video", video="nowhere.mp4")).encode(),
      json.dumps(dict(record, id="corrupt_video", video="corrupt.mp4")).encode(),
      json.dumps(dict(record, id="too_long", conversations=[
          {"from": "human", "value": "<video>\n" + "Why? " * 20_000},
          {"from": "gpt", "value": "Because."}])).encode(),
      good[0].encode(),  # its id again
      json.dumps(dict(record, id="empty", conversations=[
          {"from": "human", "value": "<video>\n "},
          {"from": "gpt", "value": "Yes."}])).encode(),
  ]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_bytes(b"\n".join([g.encode() for g in good[:3]] + bad +
                                 [g.encode() for g in good[3:]]) + b"\n")
  summaries = iterate.run(smoke_config(**{
      "iterations": 1, "data.prompts": str(prompts), "data.max_error_rate": 0.5,
      "data.prompts_per_iteration": 0}), run)
  skipped = read_jsonl(run / "prompt_errors.jsonl")
  assert [(e["line"], e["reason"]) for e in skipped] == [
      (4, "bad_json"), (5, "not_utf8"), (6, "missing_field"),
      (7, "missing_video"), (10, "duplicate_id"), (11, "empty_question")]
  assert all(e["path"] == str(prompts) for e in skipped)
  errors = read_jsonl(run / "iter_0" / "errors.jsonl")
  # Its answers and its video's context are skipped; the judge never sees it.
  corrupt = {(e["stage"], e["id"]) for e in errors
             if e["reason"] == "bad_video" and e["line"] == 8}
  assert corrupt == {("responses", "corrupt_video"), ("contexts", "corrupt.mp4")}
  too_long = [(e["stage"], e["id"], e["file"], e["line"]) for e in errors
              if e["reason"] == "prompt_too_long"]
  assert too_long == [("responses", "too_long", str(prompts), 9)]
  summary = summaries[0]
  assert sum(summary["prompts_skipped"].values()) == 6
  responses = next(s for s in summary["stages"] if s["stage"] == "responses")
  assert responses["dropped"] == {"bad_video": 1, "prompt_too_long": 1}
  assert responses["records_out"] == 6
  assert {p["prompt"] for p in read_jsonl(run / "iter_0" / "pairs.jsonl")} <= {
      json.loads(g)["conversations"][0]["value"].replace("<video>", "").strip()
      for g in good}


def test_a_rerun_of_a_finished_run_says_so_and_names_its_report(smoke_run, tmp_path,
                                                                 capsys):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  iterate.main(smoke_config(), str(workdir))
  out, err = capsys.readouterr()
  assert [line for line in err.splitlines() if line.startswith("iteration ")] == [
      f"iteration {t + 1}/2: {workdir / f'iter_{t}'}, resumed (done)" for t in (0, 1)]
  assert out.splitlines()[-1] == f"report: {workdir / 'report.md'}"
