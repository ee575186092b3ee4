"""`isr-dpo eval` on a tiny model and the synthetic world's held-out split."""
import json
import logging
import shutil

from isr_dpo_jax import bootstrap
from isr_dpo_jax import evaluate
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax.world import scenes


def test_tiny_model_table_is_right_and_survives_a_kill(tmp_path, load_config):
  config = load_config("smoke")
  setup = bootstrap.prepare(config, tmp_path)
  policy = policy_lib.Policy.from_config(config, setup, parallel.make_mesh(dict(config.mesh)))
  [row] = evaluate.evaluate_policy(policy, config, setup.test_sets, tmp_path / "eval")

  test_records = [json.loads(line) for line in open(setup.test_sets[0])]
  predictions_path = next((tmp_path / "eval").glob("*/predictions.jsonl"))
  predictions = {r["id"]: r["prediction"] for r in map(json.loads, open(predictions_path))}
  correct = [scenes.answer_is_correct(predictions[r["id"]],
                                         r["conversations"][1]["value"])
             for r in test_records]
  assert row["n"] == len(test_records) == len(predictions)
  assert row["accuracy"] == sum(correct) / len(correct)
  table = (tmp_path / "eval" / "results.md").read_text()

  # A kill mid-way: half the predictions and a cut line remain.
  lines = predictions_path.read_text().splitlines(keepends=True)
  predictions_path.write_text("".join(lines[:len(lines) // 2]) + lines[-1][:10])
  [again] = evaluate.evaluate_policy(policy, config, setup.test_sets, tmp_path / "eval")
  assert again == row
  assert (tmp_path / "eval" / "results.md").read_text() == table


def test_local_model_judge_scores_or_counts_every_answer_not_missing_videos(
    tmp_path, load_config, caplog):
  config = load_config("smoke")
  config.eval.scoring = "judge"
  setup = bootstrap.prepare(config, tmp_path)
  policy = policy_lib.Policy.from_config(config, setup, parallel.make_mesh(dict(config.mesh)))
  test_records = [json.loads(line) for line in open(setup.test_sets[0])]
  missing = test_records[-1]["video"]
  shutil.rmtree(setup.video_root / missing)
  without_video = [line for line, r in enumerate(test_records, start=1)
                   if r["video"] == missing]
  judge = evaluate.local_judge(policy, max_new_tokens=8)
  with caplog.at_level(logging.WARNING):
    [row] = evaluate.evaluate_policy(policy, config, setup.test_sets,
                                     tmp_path / "eval", judge=judge)
  judgments = [json.loads(line) for line in next(
      (tmp_path / "eval").glob("*/judgments_caption_grounded.jsonl")).open()]
  for line in without_video:
    assert (f"{setup.test_sets[0]}:{line}: bad_video: record "
            f"{test_records[line - 1]['id']}: ") in caplog.text
  assert "no such file" in caplog.text
  assert (row["n"], row["skipped"]) == (len(test_records) - len(without_video),
                                        len(without_video))
  assert len(judgments) == row["n"]  # the local judge answers every prompt
  assert row["scored"] + row["parse_failures"] == row["n"]
  assert row["parse_failures"] == sum(j["score"] is None for j in judgments)
