"""The built-in demo: a shortened recipe and loop end to end, the SFT mix, the numbers."""
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
import safetensors.numpy

from isr_dpo_jax import demo
from isr_dpo_jax import demo_report
from isr_dpo_jax import judge
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes
from isr_dpo_jax.world import sft_data

REPO = pathlib.Path(__file__).resolve().parents[1]
ITERATIONS = 2


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def demo_config():
  """The demo's loop, shortened: the shipped pi_0 on 16 questions of 3 clips."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.iterations = ITERATIONS
  config.world.num_videos = dict(train=6, test=2)
  config.demo.loop_clips = 3
  config.data.prompts_per_iteration = 16
  config.sampling.batch_size = 8
  config.sampling.context.max_new_tokens = 24
  config.self_judge.batch_size = 8
  config.eval.batch_size = 8
  # pi_0's written verdicts favour a position (docs/demo.md): judge by letter
  # likelihood and keep pairs on the average, so that every arm trains.
  config.self_judge.update(mode="likelihood", threshold=0.5, require_agreement=False)
  config.train.update(batch_size=8, epochs=1)
  return config


def recipe_config():
  """The pi_0 recipe (`--stage=sft`), shortened: a tiny model, a step or so."""
  config = demo_config()
  config.demo.update(mix_clips=4, align=dict(epochs=3, learning_rate=3e-3))
  config.world.model.update(hidden_size=32, intermediate_size=64, num_layers=1,
                            vision_hidden_size=16, vision_layers=1, patch_size=16)
  config.sft.update(batch_size=8, epochs=1)
  return config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """Every arm from the shipped pi_0."""
  workdir = tmp_path_factory.mktemp("demo")
  return workdir, demo.run(demo_config(), workdir)


@pytest.fixture(scope="module")
def pi0(tmp_path_factory):
  """The shortened recipe's workdir."""
  workdir = tmp_path_factory.mktemp("pi0")
  assert demo.train_pi0(recipe_config(), workdir) == workdir / "sft" / "model"
  return workdir


def test_summary_holds_every_field_for_every_arm_and_iteration(demo_run):
  workdir, summary = demo_run
  assert json.loads((workdir / "summary.json").read_text()) == summary
  questions = read_jsonl(workdir / "world" / "test_qa.jsonl")
  assert summary["questions"] == len(questions) and summary["seed"] == 0
  assert summary["machine"] and 0 <= summary["sft"]["accuracy"] <= 1
  assert summary["sft"]["answer_length"] > 0
  assert list(summary["arms"]) == list(demo.ARMS)
  for arm in summary["arms"].values():
    assert arm["seconds"] > 0
    assert [i["iteration"] for i in arm["iterations"]] == list(range(1, ITERATIONS + 1))
    for it in arm["iterations"]:
      assert 0 <= it["accuracy"] <= 1 and it["answer_length"] > 0
      assert 0 <= it["response_accuracy"] <= 1
      if it["pairs_one_correct"]:
        agreement = it["judge_agreement"]
        assert agreement["n"] == it["pairs_one_correct"]
        assert 0 <= agreement["value"] <= 1 and agreement["low"] <= agreement["value"]
      else:
        assert it["judge_agreement"] is None
      assert it["pairs_kept"] > 0
      assert set(it["seconds"]) == {"responses", "contexts", "judgments", "dpo"}
      assert it["seconds"]["dpo"] > 0
      change = it["change"]
      assert change["n"] == len(questions)
      assert change["value"] == pytest.approx(it["accuracy"] - summary["sft"]["accuracy"])
      assert change["low"] <= change["value"] <= change["high"]
    pooled = [i for i in arm["iterations"] if i["pairs_one_correct"]]
    agreement = arm["judge_agreement"]
    if pooled:
      assert agreement["n"] == sum(i["pairs_one_correct"] for i in pooled)
      assert agreement["value"] == pytest.approx(sum(
          i["judge_agreement"]["value"] * i["pairs_one_correct"] for i in pooled)
          / agreement["n"])
      assert agreement["low"] <= agreement["value"] <= agreement["high"]
    else:
      assert agreement is None


def test_intervals_are_those_of_the_answers_on_disk(demo_run):
  """The last change of each arm, recounted from the saved greedy answers."""
  workdir, summary = demo_run
  answers = {r["id"]: r["conversations"][1]["value"]
             for r in read_jsonl(workdir / "world" / "test_qa.jsonl")}

  def scores(eval_dir):
    [path] = eval_dir.glob("*/predictions.jsonl")
    return {r["id"]: scenes.answer_is_correct(r["prediction"], answers[r["id"]])
            for r in read_jsonl(path)}

  for name, arm in summary["arms"].items():
    before = scores(workdir / name / "iter_0" / "eval")
    after = scores(workdir / name / f"iter_{ITERATIONS - 1}" / "eval_final")
    gained = sum(after[i] and not before[i] for i in before)
    lost = sum(before[i] and not after[i] for i in before)
    n = len(before)
    spread = 1.959963984540054 * np.sqrt(gained + lost - (gained - lost) ** 2 / n) / n
    change = arm["iterations"][-1]["change"]
    np.testing.assert_allclose(
        [change["value"], change["low"], change["high"]],
        [(gained - lost) / n, (gained - lost) / n - spread, (gained - lost) / n + spread])


def test_positive_control_judges_by_the_truth(demo_run):
  """Its kept pairs all hold one right and one wrong answer, the right one chosen."""
  workdir, summary = demo_run
  answers = {r["id"]: r["conversations"][1]["value"]
             for r in read_jsonl(workdir / "loop_prompts.jsonl")}
  arm = summary["arms"]["ground_truth_judge"]
  for t in range(ITERATIONS):
    for pair in read_jsonl(workdir / "ground_truth_judge" / f"iter_{t}" / "pairs.jsonl"):
      assert scenes.answer_is_correct(pair["chosen"], answers[pair["id"]])
      assert not scenes.answer_is_correct(pair["rejected"], answers[pair["id"]])
  assert all(i["pairs_kept"] == i["pairs_one_correct"] for i in arm["iterations"])
  assert arm["judge_agreement"] is None or arm["judge_agreement"]["value"] == 1


def test_arms_share_what_pi0_computes_and_write_contexts_only_to_read_them(demo_run):
  """pi_0's answers and samples are computed once; no_retrospection's first
  iteration is ISR-DPO's; the arms whose judge reads no context write none."""
  workdir, _ = demo_run
  first = lambda arm, pattern: read_jsonl(next((workdir / arm / "iter_0").glob(pattern)))
  for arm in demo.ARMS:
    assert first(arm, "eval/*/predictions.jsonl") == first("isr_dpo", "eval/*/predictions.jsonl")
    assert first(arm, "responses.jsonl") == first("isr_dpo", "responses.jsonl")
  assert (json.loads((workdir / "no_retrospection" / "iter_0" / "summary.json").read_text())
          == json.loads((workdir / "isr_dpo" / "iter_0" / "summary.json").read_text()))
  for arm in demo.ARMS:
    for t in range(ITERATIONS):
      contexts = read_jsonl(workdir / arm / f"iter_{t}" / "contexts.jsonl")
      reads = arm in ("isr_dpo", "no_retrospection")
      assert len(contexts) == (3 if reads else 0)


def test_loop_asks_every_question_of_its_clips_and_no_other(demo_run):
  workdir, _ = demo_run
  train = [c for c in read_jsonl(workdir / "world" / "ground_truth.jsonl")
           if c["split"] == "train"]
  clips = {c["video"] for c in train[-demo_config().demo.loop_clips:]}
  prompts = read_jsonl(workdir / "loop_prompts.jsonl")
  assert prompts == [r for r in read_jsonl(workdir / "world" / "train_qa.jsonl")
                     if r["video"] in clips]


def test_report_and_arms_follow_their_configs(demo_run):
  workdir, summary = demo_run
  report = (workdir / "report.md").read_text()
  assert (workdir / "report.png").stat().st_size > 0
  assert demo_report.table(summary) in report
  for arm in demo.ARMS:
    assert f"| {arm} | {ITERATIONS} |" in report
  contexts = {arm: read_jsonl(workdir / arm / "iter_1" / "contexts.jsonl")
              for arm in ("isr_dpo", "no_retrospection")}
  assert all(c["previous"] for c in contexts["isr_dpo"])
  assert not any(c["previous"] for c in contexts["no_retrospection"])


def test_rerun_continues_from_the_finished_phases(demo_run, pi0):
  workdir, summary = demo_run
  stamp = (pi0 / "sft" / "model" / "model.safetensors").stat().st_mtime
  assert demo.train_pi0(recipe_config(), pi0) == pi0 / "sft" / "model"
  assert (pi0 / "sft" / "model" / "model.safetensors").stat().st_mtime == stamp
  rerun = demo.run(demo_config(), workdir)
  assert {k: v for k, v in rerun.items() if k != "arms"} == {
      k: v for k, v in summary.items() if k != "arms"}
  assert ({a: arm["iterations"] for a, arm in rerun["arms"].items()}
          == {a: arm["iterations"] for a, arm in summary["arms"].items()})


def test_sft_stage_1_reads_captions_of_every_training_clip(pi0):
  train = [c for c in read_jsonl(pi0 / "world" / "ground_truth.jsonl")
           if c["split"] == "train"]
  captions = [records.conversation_turns(r["conversations"])[0]
              for r in read_jsonl(pi0 / "align_data.jsonl")]
  assert captions == [(f"<video>\n{scenes.CAPTION_PROMPT}", c["caption"]) for c in train]


def test_sft_keeps_the_random_tower_and_trains_the_rest(pi0):
  weights = {stage: safetensors.numpy.load_file(pi0 / stage / "model.safetensors")
             for stage in ("init", "align/model", "sft/model")}
  for name, init in weights["init"].items():
    moved = [not np.array_equal(init, weights[s][name]) for s in ("align/model", "sft/model")]
    assert moved == ([False, False] if "tower" in name else [True, True]), name


def test_sft_mix_teaches_judging_reading_and_revision(pi0):
  prompts = judge.Prompts()
  mix = read_jsonl(pi0 / "sft_data.jsonl")
  turns = [records.conversation_turns(r["conversations"])[0] for r in mix]
  train = [c for c in read_jsonl(pi0 / "world" / "ground_truth.jsonl")
           if c["split"] == "train"][:recipe_config().demo.mix_clips]
  assert {r["video"] for r in mix} == {c["video"] for c in train}
  asked = [q.removeprefix("<video>\n") for q, _ in turns]
  assert asked.count(prompts.first_context) == len(train)
  verdicts = [a for q, a in turns if "Response A:" in q]
  assert verdicts and {judge.parse_verdict(v) for v in verdicts} == {"A", "B"}
  revisions = [q for q in asked if q.startswith("Here is a description")]
  assert revisions
  # Judge examples shown another clip's video always show the description.
  clip_of = lambda r: r["id"].rsplit("_sft", 1)[0]
  foreign = [q for r, q in zip(mix, asked) if r["video"] != clip_of(r)]
  assert foreign and all("Response A:" in q for q in foreign)
  description = prompts.judge_context.split("{context}")[0]
  assert all(description in q for q in foreign)


def test_judge_example_verdict_checks_each_answer_then_names_the_true_one():
  clip = scenes.make_clip("train_00003")
  record = dict(description=clip.description)
  rng = np.random.default_rng(0)
  letters, shown = set(), set()
  for qa in clip.qa * 4:
    question, verdict = sft_data.judge_example(record, qa, judge.Prompts(),
                                               bool(rng.random() < 0.5), rng)
    a = question.split("Response A: ")[1].split("\n")[0]
    b = question.split("Response B: ")[1].split("\n")[0]
    letter = judge.parse_verdict(verdict)
    chosen, other = (a, b) if letter == "A" else (b, a)
    assert chosen == qa["response"]
    assert not scenes.answer_is_correct(other, qa["answer"])
    (word_a, seen_a), (word_b, seen_b) = (
        part.split(": ") for part in verdict.split(". ")[:2])
    assert scenes.answer_is_correct(a, word_a) and scenes.answer_is_correct(b, word_b)
    for word, seen in ((word_a, seen_a), (word_b, seen_b)):
      assert seen == ("yes" if re.search(rf"\b{word}\b", clip.description.lower()) else "no")
      shown.add(seen)
    letters.add(letter)
  assert letters == {"A", "B"} and shown == {"yes", "no"}


def test_corrupt_replaces_one_word_by_another_of_its_kind():
  text = scenes.make_clip("train_00001").description
  rng = np.random.default_rng(1)
  for _ in range(20):
    wrong = sft_data.corrupt(text, rng)
    changed = [(x, y) for x, y in zip(text.split(), wrong.split()) if x != y]
    assert len(changed) == 1
    before, after = (w.strip(".,:") for w in changed[0])
    assert after in scenes.alternatives(before)


def test_judge_agreement_is_the_preference_for_the_correct_answer(tmp_path):
  answers = {"a": "red", "b": "two", "c": "left", "d": "square"}
  responses = [("a", ["It is red.", "It is blue."]),  # y1 right, both orders chose it
               ("b", ["There are 3.", "There are two."]),  # y2 right, both chose y1
               ("c", ["It moves up.", "It moves down."]),  # both wrong: not counted
               ("d", ["A square.", "A circle."])]  # y1 right, the orders disagree
  p_y1 = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.5}
  records.write_jsonl(tmp_path / "responses.jsonl",
                      [dict(id=i, responses=r) for i, r in responses])
  records.write_jsonl(tmp_path / "judgments.jsonl",
                      [dict(id=i, p_y1=p) for i, p in p_y1.items()])
  scores = []
  numbers = demo_report._judging(tmp_path, answers, scores)
  assert scores == [1.0, 0.0, 0.5]
  assert numbers["response_accuracy"] == 3 / 8 and numbers["pairs_one_correct"] == 3
  assert numbers["judge_agreement"]["value"] == 0.5 and numbers["judge_agreement"]["n"] == 3
