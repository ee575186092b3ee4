"""The ISR-DPO loop as 2 processes x 4 CPU devices, against 1 process x 8.

One iteration of configs/smoke.py runs in this process (8 devices) and as a
2-process job through launch/local.sh (the `isr-dpo iterate` command): the
stages split their batches over the processes and the loader its global
batches, so both write the same records and train the same parameters. The
prompts include a video that does not decode (one process meets it, process
0 logs it), and fine length buckets make the processes' own batches pad to
different lengths unless they agree.
"""
import json
import sys

import jax
import pytest
import tolerance

from isr_dpo_jax import iterate
from isr_dpo_jax.world import build
from test_distributed import _run_job
from test_distributed import LOCAL_SH
from test_iterate import policy_params
from test_iterate import REPO
from test_iterate import smoke_config

ARTIFACTS = ("responses.jsonl", "contexts.jsonl", "judgments.jsonl",
             "pairs.jsonl", "errors.jsonl")
# Question prompts have 38-47 text tokens, judge prompts 149-195.
BUCKETS = (40, 48, 64, 160, 176, 192, 256, 512)


def assert_same_records(got, want):
  """Equal records; floats (log-probs, judge probabilities) to 1e-4."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if isinstance(w, float):
      assert g == pytest.approx(w, rel=1e-4, abs=1e-5)
    else:
      assert g == w


def artifact(workdir, name):
  """Iteration 0's records in `name`, the workdir's path left out."""
  text = (workdir / "iter_0" / name).read_text().replace(str(workdir), "")
  return [json.loads(line) for line in text.splitlines()]


def write_prompts(tmp_path, workdirs):
  """9 questions on several videos, then one on a video that does not decode.

  The answers' one call of 10 (sampling.batches_per_call) splits 5 + 5 over
  the processes: process 0 refills a slot of its 4 with its fifth prompt
  while process 1 (4 good, the corrupt one) has none and inserts dummy rows.
  The judgments' batches of 8 split 4 + 4: the second is one item, so process
  1 has no row there and runs dummy rows alongside process 0.
  """
  config = smoke_config()
  for workdir in workdirs:
    world = build.write_world(config.world, workdir / "world")
    (world["video_root"] / "corrupt.mp4").write_bytes(
        b"\x00\x00\x00\x18ftypmp42" + bytes(500))
  good = world["train_qa"].read_text().splitlines()[::4][:9]
  corrupt = json.dumps(dict(json.loads(good[0]), id="corrupt_video",
                            video="corrupt.mp4"))
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(good + [corrupt]) + "\n")
  return {"iterations": 1, "data.prompts": str(path),
          "data.prompts_per_iteration": 0, "data.max_error_rate": 0.5,
          "sampling.buckets": BUCKETS}


def test_two_processes_run_one_iteration_as_one_process_does(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  overrides = write_prompts(tmp_path, (one, two))
  [summary] = iterate.run(smoke_config(**overrides), one)
  assert summary["pairs"] > 8  # two DPO steps

  _run_job([str(LOCAL_SH), "2", "--devices", "4", "--log-dir",
            str(tmp_path / "logs"), "--", sys.executable, "-m",
            "isr_dpo_jax.cli", "iterate",
            f"--config={REPO / 'configs' / 'smoke.py'}", f"--workdir={two}",
            *(f"--config.{k}={v}".replace(" ", "")
              for k, v in overrides.items())])

  for name in ARTIFACTS:  # written once, by process 0, in the same order
    assert_same_records(artifact(two, name), artifact(one, name))
  assert {e["id"] for e in artifact(two, "errors.jsonl")} == {
      "corrupt_video", "corrupt.mp4"}
  got = json.loads((two / "iter_0" / "summary.json").read_text())
  assert got["pairs"] == summary["pairs"]
  assert got["train"]["steps"] == summary["train"]["steps"] == 2
  # The job's Orbax checkpoint of pi_1 restores here, in one process.
  tolerance.assert_adam_weights_close(
      policy_params(two, 0), policy_params(one, 0),
      learning_rate=smoke_config().train.learning_rate, steps=2)
