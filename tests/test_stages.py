"""The loop's stages on a stand-in policy: bad items are logged, counted, capped."""
import json

import numpy as np
import pytest

import conftest
import tolerance
from isr_dpo_jax import bootstrap
from isr_dpo_jax import generate
from isr_dpo_jax import judge
from isr_dpo_jax import judges
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import sampling
from isr_dpo_jax import stages
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes
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

  def _prompts(self, questions):
    """Checks each question, or each of a tuple's (a judge's orders)."""
    for question in questions:
      for q in (question,) if isinstance(question, str) else question:
        self.prompt(q)

  def sample(self, questions, videos, uids, params, *, num_samples=1, seed=0):
    self._prompts(questions)
    return [[generate.Sample(np.array([1, 2]), f"{k}: {q[:9]}", -1.0, "eos")
             for k in range(num_samples)] for q in questions]

  def letter_ids(self, letters):
    return list(range(len(letters)))

  def next_token_logprobs(self, questions, videos, token_ids, *, per_video=1):
    self._prompts(questions)
    return np.log(np.tile([0.7, 0.3], (len(questions) * per_video, 1)))


def prompt(i: int, question: str = "What moves?", video: str = "v.mp4") -> dict:
  return dict(id=f"p{i}", video=video, question=question, file="prompts.jsonl",
              line=i + 1)


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def config(max_error_rate: float, **overrides):
  return conftest.load_config("smoke", **{"data.max_error_rate": max_error_rate,
                                          **overrides})


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
  with pytest.raises(records.TooManyBadRecords) as e:  # checked after each call
    stages.responses(items, FakePolicy(), config(0.05, **{"sampling.batches_per_call": 1}),
                     0, tmp_path / "responses.jsonl", errors)
  message = str(e.value)  # after the first call: 8 items (smoke's sampling.batch_size)
  assert "\n" not in message
  assert message.startswith("responses: 6 of 12 items skipped (bad_video 6)")
  assert str(tmp_path / "errors.jsonl") in message
  # Under the rate the same stage goes on.
  errors = stages.ErrorLog(tmp_path / "errors_ok.jsonl")
  answered, summary = stages.responses(items, FakePolicy(), config(0.9), 0,
                                       tmp_path / "responses_ok.jsonl", errors)
  assert len(answered) == 2 and summary.dropped == {"bad_video": 10}


def test_a_finished_stage_rerun_says_resumed_not_its_time(tmp_path):
  cfg = config(0.5)
  per_call = cfg.sampling.batch_size * cfg.sampling.batches_per_call
  items = [prompt(i) for i in range(per_call + 4)]  # calls of per_call and 4
  run = lambda: stages.responses(items, FakePolicy(), cfg, 0,
                                 tmp_path / "responses.jsonl",
                                 stages.ErrorLog(tmp_path / "errors.jsonl"))
  first, summary = run()
  assert summary.resumed == 0 and summary.line().endswith("s")
  lines = (tmp_path / "responses.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "responses.jsonl").write_text("".join(lines[:8]))  # killed in call 1
  again, summary = run()
  assert again == first and summary.resumed == 0  # the whole call rerun
  (tmp_path / "responses.jsonl").write_text("".join(lines[:per_call + 2]))  # in call 2
  again, summary = run()
  assert again == first and summary.resumed == per_call
  assert f", {per_call} resumed, " in summary.line()
  again, summary = run()
  assert again == first and summary.done_before() and summary.tokens == 0
  assert summary.line() == (
      f"responses: {len(items)} in, {len(items)} out, dropped: none, resumed (done)")


@pytest.mark.parametrize("mode, kind", [("likelihood", "prompt"),
                                        ("generative", "generated")])
def test_the_judgments_summary_counts_the_judge_s_tokens(mode, kind, tmp_path):
  answered = [dict(prompt(i), responses=["yes", "no"]) for i in range(3)]
  cfg = conftest.load_config("smoke", **{"self_judge.mode": mode})
  _, summary = stages.judgments(answered, {}, FakePolicy(), cfg, 0,
                                tmp_path / "judgments.jsonl",
                                stages.ErrorLog(tmp_path / "errors.jsonl"))
  questions = [q for x in answered for q in judge.judge_questions(
      judge.Prompts(), x["question"], *x["responses"], None)]
  read = sum(len(FakePolicy().prompt(q)) for q in questions)
  written = sum(s.length for q in questions for s, in FakePolicy().sample([q], [], [], None))
  assert (summary.token_kind, summary.tokens) == (
      kind, {"prompt": read, "generated": written}[kind])
  assert f" {kind} tokens/s, " in summary.line()


# The judgments stage with each judge.


@pytest.fixture(name="smoke", scope="module")
def smoke_fixture(tmp_path_factory):
  """configs/smoke.py's world and pi_0, and 16 of its prompts answered twice:
  right then wrong, wrong then right, or the same answer twice; and the right
  answer of each."""
  config = conftest.load_config("smoke")
  setup = bootstrap.prepare(config, tmp_path_factory.mktemp("smoke"))
  policy = policy_lib.Policy.from_config(config, setup,
                                         parallel.make_mesh(dict(config.mesh)))
  answered, right_of = [], {}
  for line, record in enumerate(read_jsonl(setup.prompts)[:16], start=1):
    (question, answer), = records.conversation_turns(record["conversations"])
    question = question.replace("<video>", "").strip()
    right, wrong = f"It is {answer}.", f"It is {scenes.alternatives(answer)[0]}."
    responses = [[right, wrong], [wrong, right], [right, right]][line % 3]
    answered.append(dict(id=record["id"], video=record["video"], question=question,
                         responses=responses, lengths=[len(y.split()) for y in responses],
                         file=str(setup.prompts), line=line))
    right_of[record["id"]] = right
  return setup, policy, answered, right_of


# The generating stages on pi_0.


def _generate(smoke, path, **overrides) -> dict[str, list[dict]]:
  """The records of stages 1a and 1b: answers to smoke_fixture's prompts, and
  contexts of all the world's videos, every other one revisiting an earlier
  context."""
  setup, policy, answered, _ = smoke
  cfg = conftest.load_config("smoke", **overrides)
  items = [{k: x[k] for k in ("id", "video", "question", "file", "line")}
           for x in answered]
  videos = [dict(id=v, video=v)
            for v in sorted({x["video"] for x in read_jsonl(setup.prompts)})]
  previous = {v["video"]: "A red square moves left." for v in videos[::2]}
  errors = stages.ErrorLog(path / "errors.jsonl")
  stages.responses(items, policy, cfg, 3, path / "responses.jsonl", errors)
  stages.contexts(videos, previous, policy, cfg, 3, path / "contexts.jsonl", errors)
  errors.close()
  return {name: read_jsonl(path / f"{name}.jsonl") for name in ("responses", "contexts")}


def test_generating_stages_records_do_not_depend_on_the_calls(smoke, tmp_path):
  """Each stage's two sampling batches in one call (the engine's slots refill
  from the second batch) or in one call each: the same records, key for key;
  log-probs to float tolerance (a prompt may run at another padded width)."""
  (tmp_path / "together").mkdir()
  (tmp_path / "apart").mkdir()
  together = _generate(smoke, tmp_path / "together")
  apart = _generate(smoke, tmp_path / "apart", **{"sampling.batches_per_call": 1})
  batch_size = conftest.load_config("smoke").sampling.batch_size
  assert all(len(r) > batch_size for r in together.values())  # two batches each
  for name in together:
    for got, want in zip(together[name], apart[name], strict=True):
      assert got.keys() == want.keys()
      tolerance.assert_close(got.pop("logprobs", []), want.pop("logprobs", []))
      assert got == want


def test_a_generating_stage_killed_mid_call_resumes_to_the_same_records(smoke, tmp_path):
  """A stage rerun after a kill reruns its last call whole: the records of an
  uninterrupted run, bit for bit."""
  first = _generate(smoke, tmp_path)
  for name in first:
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / f"{name}.jsonl").write_text("".join(lines[:5]))
  assert _generate(smoke, tmp_path) == first


def _judge(smoke, mode: str, path, **overrides):
  setup, policy, answered, _ = smoke
  cfg = conftest.load_config("smoke", **{"self_judge.mode": mode, **overrides})
  contexts = {x["video"]: "A red square moves left." for x in answered[::2]}
  errors = stages.ErrorLog(path / f"{mode}_errors.jsonl")
  judged, summary = stages.judgments(answered, contexts, policy, cfg, 7,
                                     path / f"{mode}.jsonl", errors,
                                     ground_truth=setup.ground_truth)
  errors.close()
  return judged, summary, contexts


@pytest.mark.parametrize("mode", ["likelihood", "generative"])
def test_self_judges_ask_pi_t_the_protocol_s_questions_alike_every_run(smoke, mode, tmp_path):
  """The records of a fixed seed, as the stage wrote them before judges.py:
  pi_t's letter log-probs or verdicts on both orders of each pair, batch by
  batch, and the decision on their average; identical pairs, never judged,
  have no evidence."""
  (tmp_path / "again").mkdir()
  _, summary, contexts = _judge(smoke, mode, tmp_path)
  _judge(smoke, mode, tmp_path / "again")
  judged = read_jsonl(tmp_path / f"{mode}.jsonl")
  assert judged == read_jsonl(tmp_path / "again" / f"{mode}.jsonl")
  _, policy, answered, _ = smoke
  assert [j["id"] for j in judged] == [x["id"] for x in answered]
  cfg = conftest.load_config("smoke")
  evidence = []
  for start in range(0, len(answered), cfg.self_judge.batch_size):  # the stage's batches
    batch = [x for x in answered[start:start + cfg.self_judge.batch_size]
             if not judge.identical(*x["responses"])]
    questions = [q for x in batch for q in judge.judge_questions(
        judge.Prompts(), x["question"], *x["responses"], contexts.get(x["video"]))]
    frames = [policy.video(x["video"]) for x in batch for _ in range(2)]
    if mode == "likelihood":
      evidence += policy.next_token_logprobs(questions, frames,
                                             policy.letter_ids("AB")).reshape(-1, 2, 2).tolist()
    else:
      uids = [generate.stable_uid("verdict", x["id"], o) for x in batch for o in (0, 1)]
      params = sampling.SamplingParams(temperature=0.0,
                                       max_new_tokens=cfg.self_judge.max_new_tokens)
      texts = [s[0].text for s in policy.sample(questions, frames, uids, params, seed=7)]
      evidence += [list(t) for t in zip(texts[0::2], texts[1::2])]
  same = [judge.identical(*x["responses"]) for x in answered]
  assert [(j["raw"], j["p_y1"], j["reason"]) for j, s in zip(judged, same) if s] == (
      [(None, 0.5, judge.IDENTICAL)] * sum(same))
  assert summary.dropped[judge.IDENTICAL] == sum(same)
  judged, answered = zip(*[(j, x) for j, x, s in zip(judged, answered, same) if not s])
  if mode == "likelihood":
    tolerance.assert_close([j["raw"] for j in judged], evidence)
    p_y1_Nx2 = judge.letter_preferences(np.array([j["raw"] for j in judged]))
    judged_N = np.ones(len(judged), bool)
  else:
    assert [j["raw"] for j in judged] == evidence
    p_y1_Nx2, judged_N = judge.verdict_preferences(
        [tuple(map(judge.parse_verdict, j["raw"])) for j in judged])
  p_y1, agree = judge.average_orders(p_y1_Nx2, judged_N)
  for j, x, p, a, ok in zip(judged, answered, p_y1, agree, judged_N):
    decision = judge.decide(*x["responses"], p, a, cfg.self_judge.threshold,
                            None if ok else judge.UNPARSABLE, cfg.self_judge.require_agreement)
    assert (j["p_y1"], j["agree"], j["winner"], j["reason"]) == (
        p, a, decision.winner, decision.reason)
  assert summary.records_out == sum(j["winner"] is not None for j in judged)


def test_the_ground_truth_judge_keeps_the_right_answer_as_chosen(smoke, tmp_path):
  judged, summary, _ = _judge(smoke, "ground_truth", tmp_path)
  _, _, answered, right_of = smoke
  want = {x["id"]: [0, 1, None][x["line"] % 3] for x in answered}  # as smoke_fixture
  assert {j["id"]: j["winner"] for j in judged} == want
  pairs = stages.preference_records(answered, judged)
  assert [p["chosen"] for p in pairs] == [right_of[p["id"]] for p in pairs]
  assert all(p["rejected"] != right_of[p["id"]] for p in pairs)
  identical = sum(w is None for w in want.values())
  assert summary.dropped == {judge.IDENTICAL: identical}
  assert summary.records_out == len(pairs) == len(answered) - identical


def test_the_ground_truth_judge_counts_pairs_with_both_or_neither_right(tmp_path):
  world = scenes.write_world(tmp_path / "world", {"train": 1})
  clip = read_jsonl(world["ground_truth"])[0]
  qa = clip["qa"][0]  # how many shapes
  answered = [dict(prompt(i, qa["question"], clip["video"]), responses=ys)
              for i, ys in enumerate([[qa["response"], qa["answer"]],
                                      ["Four.", "None."], [qa["response"], "None."]])]
  errors = stages.ErrorLog(tmp_path / "errors.jsonl")
  judged, summary = stages.judgments(
      answered, {}, FakePolicy(), conftest.load_config("smoke", **{"self_judge.mode": "ground_truth"}),
      0, tmp_path / "judgments.jsonl", errors, ground_truth=world["ground_truth"])
  assert [j["reason"] for j in judged] == [judges.BOTH_CORRECT, judges.NEITHER_CORRECT, None]
  assert summary.dropped == {judges.BOTH_CORRECT: 1, judges.NEITHER_CORRECT: 1}
  assert judged[2]["winner"] == 0 and summary.records_out == 1
