"""The ISR-DPO loop end to end on configs/smoke.py: artifacts, resume, bad input."""
import json
import importlib.util
import pathlib

import numpy as np
import pytest

from flax import nnx

from isr_dpo_jax import iterate
from isr_dpo_jax import models
from isr_dpo_jax import policy as policy_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  spec = importlib.util.spec_from_file_location("smoke", REPO / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def policy_params(workdir, t=None):
  """pi_0 (t None) or the policy saved by iteration t, as a pure dict."""
  model = models.load_pretrained(workdir / "init")
  if t is not None:
    policy_lib.load_params(model, workdir / f"iter_{t}" / "policy")
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
