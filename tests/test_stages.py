"""The loop's stages on a stand-in policy: bad items are logged, counted, capped."""
import json

import numpy as np
import pytest

import conftest
from isr_dpo_jax import generate
from isr_dpo_jax import stages
from isr_dpo_jax.data import records
from isr_dpo_jax.data import video as video_lib

MAX_PROMPT_CHARS = 400  # the judge template alone takes 240


class FakePolicy:
  """A policy that needs no model: a video named "bad*" does not decode, a
  question over MAX_PROMPT_CHARS does not fit (sampling raises, as the real
  one does), and answers echo the question."""

  @property
  def encoder(self):
    return self

  def prompt(self, question: str) -> np.ndarray:
    if len(question) > MAX_PROMPT_CHARS:
      raise records.BadRecord("prompt_too_long",
                              f"{len(question)} prompt tokens > {MAX_PROMPT_CHARS}")
    return np.zeros(len(question), np.int32)

  def video(self, name: str) -> np.ndarray:
    if name.startswith("bad"):
      raise video_lib.VideoError(name, "moov atom not found")
    return np.zeros((1, 2, 2, 3), np.float32)

  def sample(self, questions, videos, uids, params, *, num_samples=1, seed=0):
    for question in questions:
      self.prompt(question)
    return [[generate.Sample(np.array([1, 2]), f"{k}: {q[:9]}", -1.0, "eos")
             for k in range(num_samples)] for q in questions]

  def letter_ids(self, letters):
    return list(range(len(letters)))

  def next_token_logprobs(self, questions, videos, token_ids):
    for question in questions:
      self.prompt(question)
    return np.log(np.tile([0.7, 0.3], (len(questions), 1)))


def prompt(i: int, question: str = "What moves?", video: str = "v.mp4") -> dict:
  return dict(id=f"p{i}", video=video, question=question, file="prompts.jsonl",
              line=i + 1)


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def config(max_error_rate: float):
  return conftest.load_config("smoke", **{"data.max_error_rate": max_error_rate})


def test_a_prompt_too_long_is_skipped_with_its_line(tmp_path):
  items = [prompt(i) for i in range(5)]
  items[2] = prompt(2, question="x" * 100_000)
  errors = stages.ErrorLog(tmp_path / "errors.jsonl")
  answered, summary = stages.responses(items, FakePolicy(), config(0.5), 0,
                                       tmp_path / "responses.jsonl", errors)
  errors.close()
  assert [r["id"] for r in answered] == ["p0", "p1", "p3", "p4"]
  (error,) = read_jsonl(tmp_path / "errors.jsonl")
  assert error == dict(stage="responses", id="p2", file="prompts.jsonl", line=3,
                       reason="prompt_too_long",
                       detail=f"100000 prompt tokens > {MAX_PROMPT_CHARS}")
  assert summary.dropped == {"prompt_too_long": 1}


def test_a_judge_prompt_too_long_is_skipped_with_its_line(tmp_path):
  answered = [dict(prompt(i), responses=["yes", "no"]) for i in range(4)]
  answered[1]["responses"] = ["yes " * 100, "no"]
  errors = stages.ErrorLog(tmp_path / "errors.jsonl")
  judged, summary = stages.judgments(answered, {}, FakePolicy(), config(0.5), 0,
                                     tmp_path / "judgments.jsonl", errors)
  errors.close()
  assert [j["id"] for j in judged] == ["p0", "p2", "p3"]
  (error,) = read_jsonl(tmp_path / "errors.jsonl")
  assert (error["stage"], error["id"], error["line"], error["reason"]) == (
      "judgments", "p1", 2, "prompt_too_long")


def test_undecodable_videos_past_the_error_rate_stop_the_run(tmp_path):
  items = [prompt(i, video="bad.mp4" if i % 6 else "v.mp4") for i in range(12)]
  errors = stages.ErrorLog(tmp_path / "errors.jsonl")
  with pytest.raises(records.TooManyBadRecords) as e:
    stages.responses(items, FakePolicy(), config(0.05), 0,
                     tmp_path / "responses.jsonl", errors)
  message = str(e.value)  # after the first batch of 8 (smoke's sampling.batch_size)
  assert "\n" not in message
  assert message.startswith("responses: 6 of 12 items skipped (bad_video 6)")
  assert str(tmp_path / "errors.jsonl") in message
  # Under the rate the same stage goes on.
  errors = stages.ErrorLog(tmp_path / "errors_ok.jsonl")
  answered, summary = stages.responses(items, FakePolicy(), config(0.9), 0,
                                       tmp_path / "responses_ok.jsonl", errors)
  assert len(answered) == 2 and summary.dropped == {"bad_video": 10}
