"""Judge prompts, decisions and the judges' registry against hand-computed references."""
import json
import re

from hypothesis import given
from hypothesis import strategies as st
import numpy as np
import pytest

import conftest
from isr_dpo_jax import judge
from isr_dpo_jax import judges
from isr_dpo_jax import settings
from isr_dpo_jax.world import scenes


def test_context_question_revisits_the_previous_context():
  prompts = judge.Prompts()
  assert judge.context_question(prompts, None) == judge.FIRST_CONTEXT
  retro = judge.context_question(prompts, "A red square moves left.")
  assert "written earlier: A red square moves left.\n" in retro


def test_judge_questions_swap_the_responses_and_drop_context_on_request():
  prompts = judge.Prompts()
  first, second = judge.judge_questions(prompts, "Q?", "one", "two", "desc")
  assert "Response A: one\nResponse B: two" in first
  assert "Response A: two\nResponse B: one" in second
  assert first.startswith("Video description: desc\nQuestion: Q?")
  no_context, _ = judge.judge_questions(prompts, "Q?", "one", "two", None)
  assert no_context.startswith("Question: Q?") and "description:" not in no_context


def _softmax2(a, b):
  return np.exp(a) / (np.exp(a) + np.exp(b))


def test_letter_preferences_average_to_the_two_letter_softmax():
  rng = np.random.default_rng(0)
  logps = rng.normal(size=(64, 2, 2)) * 3 - 5  # unnormalised over the vocab
  p_y1, agree = judge.average_orders(judge.letter_preferences(logps), np.ones(64, bool))
  order0 = _softmax2(logps[:, 0, 0], logps[:, 0, 1])  # y1 is A
  order1 = _softmax2(logps[:, 1, 1], logps[:, 1, 0])  # y1 is B
  np.testing.assert_allclose(p_y1, (order0 + order1) / 2, rtol=1e-12)
  np.testing.assert_array_equal(agree, (order0 > 0.5) == (order1 > 0.5))


def test_a_position_bias_makes_the_orders_disagree():
  # A judge that likes whatever stands first by +2 nats, and y1 by +1 nat:
  # each order alone picks position A, so the pair is flagged, and the
  # average leans to y1 by less than order 0 alone claims.
  logps = np.array([[[2.0 + 1.0, 0.0], [2.0, 1.0]]])
  p_y1, agree = judge.average_orders(judge.letter_preferences(logps), [True])
  assert not agree[0]
  assert p_y1[0] == pytest.approx((_softmax2(3.0, 0) + _softmax2(1.0, 2.0)) / 2)
  assert 0.5 < p_y1[0] < _softmax2(3.0, 0.0)


@pytest.mark.parametrize("y1,y2,p,agree,no_verdict,want", [
    ("same", " same ", 0.9, True, None, (None, judge.IDENTICAL)),
    ("same", "same", 0.5, False, judge.UNPARSABLE, (None, judge.IDENTICAL)),
    ("x", "y", 0.9, True, judge.UNPARSABLE, (None, judge.UNPARSABLE)),
    ("x", "y", 0.5, False, "both_correct", (None, "both_correct")),
    ("x", "y", 0.9, False, None, (None, judge.INCONSISTENT)),
    ("x", "y", 0.55, True, None, (None, judge.LOW_CONFIDENCE)),
    ("x", "y", 0.8, True, None, (0, None)),
    ("x", "y", 0.2, True, None, (1, None)),
])
def test_decide(y1, y2, p, agree, no_verdict, want):
  decision = judge.decide(y1, y2, p, agree, threshold=0.6, no_verdict=no_verdict)
  assert (decision.winner, decision.reason) == want
  assert decision.confidence == pytest.approx(max(p, 1 - p))


def test_decide_keeps_disagreeing_orders_when_asked():
  decision = judge.decide("x", "y", 0.7, False, threshold=0.6, require_agreement=False)
  assert (decision.winner, decision.reason) == (0, None)


@pytest.mark.parametrize("text,want", [
    ("A", "A"), ("B.", "B"), ("(B) is better", "B"), ("  A: it is grounded", "A"),
    ("Response B is more accurate.", "B"),
    ("I prefer answer A because response A mentions the red square.", "A"),
    ("Response A is long, Response B is right.", None),
    ("A square moves left.", None),  # a leading article, not a verdict
    ("Both are fine.", None), ("", None),
    ("the answer a user wants", None),  # lowercase letters are words
])
def test_parse_verdict(text, want):
  assert judge.parse_verdict(text) == want


_FILLER = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.", max_size=40)


@given(letter=st.sampled_from("AB"), before=_FILLER, after=_FILLER,
       noun=st.sampled_from(["Response", "response", "Answer", "Option"]))
def test_parse_verdict_finds_a_single_named_letter(letter, before, after, noun):
  text = f"{before} {noun} {letter} {after}".strip()
  assert judge.parse_verdict(text) == letter


@given(st.lists(st.tuples(st.sampled_from(["A", "B", None]),
                          st.sampled_from(["A", "B", None])), min_size=1))
def test_verdict_preferences(verdicts):
  p_y1_Nx2, parsed = judge.verdict_preferences(verdicts)
  p_y1, agree = judge.average_orders(p_y1_Nx2, parsed)
  for (first, second), p, a, ok in zip(verdicts, p_y1, agree, parsed):
    assert ok == (first is not None and second is not None)
    votes = [first == "A", second == "B"]
    assert p == (sum(votes) / 2 if ok else 0.5)
    assert a == (ok and votes[0] == votes[1])


# The judges behind one type.


@pytest.fixture(name="world", scope="module")
def world_fixture(tmp_path_factory):
  return scenes.write_world(tmp_path_factory.mktemp("world"), {"train": 6}, seed=0)


class LetterPolicy:
  """Enough of a policy to build every judge."""

  def letter_ids(self, letters):
    return list(range(len(letters)))


def _config(mode: str):
  return conftest.load_config("smoke", **{"self_judge.mode": mode})


def test_the_registry_names_the_modes_config_validation_accepts():
  assert tuple(judges.JUDGES) == judge.MODES


@pytest.mark.parametrize("mode", judge.MODES)
def test_make_builds_the_judge_judge_mode_names(mode, world):
  built = judges.make(_config(mode), LetterPolicy(), 0, world["ground_truth"])
  assert type(built) is judges.JUDGES[mode]


def test_an_unknown_mode_is_a_config_error_naming_the_known_ones():
  with pytest.raises(settings.ConfigError) as e:
    judges.make(_config("oracle"), LetterPolicy(), 0)
  assert str(e.value) == ("self_judge.mode='oracle': must be one of likelihood, "
                          "generative, ground_truth")


def test_the_ground_truth_judge_without_a_world_is_a_config_error():
  with pytest.raises(settings.ConfigError, match=r"self_judge.mode='ground_truth'.*"
                     r"config.world is None.*likelihood, generative$"):
    judges.make(_config("ground_truth"), LetterPolicy(), 0, ground_truth=None)


def _wrong(qa: dict) -> str:
  """The world's response with its answer swapped for another of its kind."""
  other = scenes.alternatives(qa["answer"])[0]
  return re.sub(rf"\b{qa['answer']}\b", other, qa["response"])


def _pair(clip: dict, question: str, y1: str, y2: str) -> judges.Pair:
  return judges.Pair(f"{clip['id']}:{question}", clip["video"], question, (y1, y2),
                     None, ("", ""), np.zeros((1, 2, 2, 3), np.float32))


def test_the_ground_truth_judge_prefers_the_world_s_answer(world):
  clips = [json.loads(line) for line in world["ground_truth"].read_text().splitlines()]
  qas = [(clip, qa) for clip in clips for qa in clip["qa"]]
  assert {qa["kind"] for _, qa in qas} == {"count", "color", "shape", "direction",
                                           "event", "order"}
  pairs, want = [], []
  for clip, qa in qas:  # each of the world's questions, in four arrangements
    right, wrong, q = qa["response"], _wrong(qa), qa["question"]
    pairs += [_pair(clip, q, right, wrong), _pair(clip, q, wrong, right),
              _pair(clip, q, right, f"{qa['answer']}."),
              _pair(clip, q, wrong, "I cannot tell.")]
    want += [(1.0, None), (0.0, None), (0.5, judges.BOTH_CORRECT),
             (0.5, judges.NEITHER_CORRECT)]
  verdicts = judges.make(_config("ground_truth"), None, 0, world["ground_truth"])(pairs)
  np.testing.assert_array_equal(verdicts.p_y1_Nx2[:, 0], verdicts.p_y1_Nx2[:, 1])
  assert list(zip(verdicts.p_y1_Nx2[:, 0], verdicts.no_verdict)) == want
  first = verdicts.evidence[0]
  assert first == dict(answer=qas[0][1]["answer"], correct=[True, False])


def test_the_ground_truth_judge_has_no_verdict_on_a_question_the_world_never_asks(world):
  clip = json.loads(world["ground_truth"].read_text().splitlines()[0])
  judge_fn = judges.make(_config("ground_truth"), None, 0, world["ground_truth"])
  verdicts = judge_fn([_pair(clip, "Is it raining?", "yes", "no")])
  assert verdicts.no_verdict == [judges.NO_GROUND_TRUTH]
  assert verdicts.evidence == [dict(answer=None, correct=[False, False])]
