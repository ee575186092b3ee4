"""The built-in demo: a shortened run end to end, its SFT mix and its numbers."""
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
import safetensors.numpy

from isr_dpo_jax import demo
from isr_dpo_jax import judge
from isr_dpo_jax.data import records
from isr_dpo_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
ITERATIONS = 2


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.iterations = ITERATIONS
  config.world.num_videos = dict(train=8, test=4)
  config.world.model.update(hidden_size=32, intermediate_size=64, vision_hidden_size=16)
  config.sft.update(batch_size=8, epochs=1)
  config.data.prompts_per_iteration = 8
  config.sampling.batch_size = 8
  config.sampling.context.max_new_tokens = 12
  config.eval.batch_size = 8
  # A model this small writes no parsable verdict and prefers a letter:
  # judge by letter likelihood and keep pairs on the average, so DPO runs.
  config.self_judge.update(mode="likelihood", threshold=0.5, require_agreement=False)
  config.train.update(batch_size=8, epochs=1)
  return config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  return workdir, demo.run(demo_config(), workdir)


def test_summary_holds_every_field_for_every_arm_and_iteration(demo_run):
  workdir, summary = demo_run
  assert json.loads((workdir / "summary.json").read_text()) == summary
  assert summary["sft"]["seconds"] > 0 and 0 <= summary["sft"]["accuracy"] <= 1
  assert set(summary["arms"]) == set(demo.ARMS)
  for arm in summary["arms"].values():
    assert arm["sft"] == {k: summary["sft"][k] for k in ("accuracy", "answer_length")}
    assert arm["seconds"] > 0
    assert [i["iteration"] for i in arm["iterations"]] == list(range(ITERATIONS))
    for it in arm["iterations"]:
      assert 0 <= it["accuracy"] <= 1 and it["answer_length"] > 0
      assert 0 <= it["response_accuracy"] <= 1
      assert it["judge_agreement"] is None or 0 <= it["judge_agreement"] <= 1
      assert (it["judge_agreement"] is None) == (it["pairs_one_correct"] == 0)
      assert it["pairs_kept"] > 0
      assert set(it["seconds"]) == {"responses", "contexts", "judgments", "dpo"}
      assert it["seconds"]["dpo"] > 0


def test_report_and_arms_follow_their_configs(demo_run):
  workdir, summary = demo_run
  report = (workdir / "report.md").read_text()
  assert (workdir / "report.png").stat().st_size > 0
  assert demo.table(summary) in report
  for arm in demo.ARMS:
    assert f"| {arm} | {ITERATIONS - 1} |" in report
  contexts = {arm: read_jsonl(workdir / arm / "iter_1" / "contexts.jsonl")
              for arm in ("isr_dpo", "no_retrospection")}
  assert all(c["previous"] for c in contexts["isr_dpo"])
  assert not any(c["previous"] for c in contexts["no_retrospection"])


def test_rerun_continues_from_the_finished_phases(demo_run):
  workdir, summary = demo_run
  stamp = (workdir / "sft" / "model" / "model.safetensors").stat().st_mtime
  assert demo.run(demo_config(), workdir) == summary
  assert (workdir / "sft" / "model" / "model.safetensors").stat().st_mtime == stamp


def test_sft_stage_1_reads_captions_of_every_training_clip(demo_run):
  workdir, _ = demo_run
  train = [c for c in read_jsonl(workdir / "world" / "ground_truth.jsonl")
           if c["split"] == "train"]
  captions = [records.conversation_turns(r["conversations"])[0]
              for r in read_jsonl(workdir / "align_data.jsonl")]
  assert captions == [(f"<video>\n{synthetic.CAPTION_PROMPT}", c["caption"]) for c in train]


def test_sft_keeps_the_random_tower_and_trains_the_rest(demo_run):
  workdir, _ = demo_run
  weights = {stage: safetensors.numpy.load_file(workdir / stage / "model.safetensors")
             for stage in ("init", "align/model", "sft/model")}
  for name, init in weights["init"].items():
    moved = [not np.array_equal(init, weights[s][name]) for s in ("align/model", "sft/model")]
    assert moved == ([False, False] if "tower" in name else [True, True]), name


def test_sft_mix_teaches_judging_and_revision(demo_run):
  workdir, _ = demo_run
  prompts = judge.Prompts()
  mix = read_jsonl(workdir / "sft_data.jsonl")
  turns = [records.conversation_turns(r["conversations"])[0] for r in mix]
  train = [c for c in read_jsonl(workdir / "world" / "ground_truth.jsonl")
           if c["split"] == "train"]
  assert {r["video"] for r in mix} == {c["video"] for c in train}
  asked = [q.removeprefix("<video>\n") for q, _ in turns]
  assert asked.count(prompts.first_context) == len(train)
  verdicts = [a for q, a in turns if "Response A:" in q]
  assert verdicts and {judge.parse_verdict(v) for v in verdicts} == {"A", "B"}
  revisions = [q for q in asked if q.startswith("Here is a description")]
  assert revisions


def test_judge_example_verdict_checks_each_answer_then_names_the_true_one():
  clip = synthetic.make_clip("train_00003")
  record = dict(description=clip.description)
  rng = np.random.default_rng(0)
  letters, shown = set(), set()
  for qa in clip.qa * 4:
    question, verdict = demo.judge_example(record, qa, judge.Prompts(), 0.5, rng)
    a = question.split("Response A: ")[1].split("\n")[0]
    b = question.split("Response B: ")[1].split("\n")[0]
    letter = judge.parse_verdict(verdict)
    chosen, other = (a, b) if letter == "A" else (b, a)
    assert chosen == qa["response"]
    assert not synthetic.answer_is_correct(other, qa["answer"])
    (word_a, seen_a), (word_b, seen_b) = (
        part.split(": ") for part in verdict.split(". ")[:2])
    assert synthetic.answer_is_correct(a, word_a) and synthetic.answer_is_correct(b, word_b)
    for word, seen in ((word_a, seen_a), (word_b, seen_b)):
      assert seen == ("yes" if re.search(rf"\b{word}\b", clip.description.lower()) else "no")
      shown.add(seen)
    letters.add(letter)
  assert letters == {"A", "B"} and shown == {"yes", "no"}


def test_corrupt_replaces_one_word_by_another_of_its_kind():
  text = synthetic.make_clip("train_00001").description
  rng = np.random.default_rng(1)
  for _ in range(20):
    wrong = demo.corrupt(text, rng)
    changed = [(x, y) for x, y in zip(text.split(), wrong.split()) if x != y]
    assert len(changed) == 1
    before, after = (w.strip(".,:") for w in changed[0])
    assert after in synthetic.alternatives(before)


def test_judge_agreement_counts_kept_pairs_with_one_correct_answer(tmp_path):
  answers = {"a": "red", "b": "two", "c": "left", "d": "square"}
  responses = [("a", ["It is red.", "It is blue."]),  # kept, chose right
               ("b", ["There are 3.", "There are two."]),  # kept, chose wrong
               ("c", ["It moves up.", "It moves down."]),  # both wrong
               ("d", ["A square.", "A circle."])]  # dropped
  winners = {"a": 0, "b": 0, "c": 1, "d": None}
  records.write_jsonl(tmp_path / "responses.jsonl",
                      [dict(id=i, responses=r) for i, r in responses])
  records.write_jsonl(tmp_path / "judgments.jsonl",
                      [dict(id=i, winner=w) for i, w in winners.items()])
  numbers = demo._judging(tmp_path, answers)
  assert numbers == dict(response_accuracy=3 / 8, judge_agreement=0.5,
                         pairs_one_correct=2)
