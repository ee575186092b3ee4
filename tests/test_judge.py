"""Judge prompts and decisions against hand-computed references."""
from hypothesis import given
from hypothesis import strategies as st
import numpy as np
import pytest

from isr_dpo_jax import judge


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


def test_preference_from_letters_matches_two_letter_softmax():
  rng = np.random.default_rng(0)
  logps = rng.normal(size=(64, 2, 2)) * 3 - 5  # unnormalised over the vocab
  p_y1, agree = judge.preference_from_letters(logps)
  order0 = _softmax2(logps[:, 0, 0], logps[:, 0, 1])  # y1 is A
  order1 = _softmax2(logps[:, 1, 1], logps[:, 1, 0])  # y1 is B
  np.testing.assert_allclose(p_y1, (order0 + order1) / 2, rtol=1e-12)
  np.testing.assert_array_equal(agree, (order0 > 0.5) == (order1 > 0.5))


def test_a_position_bias_makes_the_orders_disagree():
  # A judge that likes whatever stands first by +2 nats, and y1 by +1 nat:
  # each order alone picks position A, so the pair is flagged, and the
  # average leans to y1 by less than order 0 alone claims.
  logps = np.array([[[2.0 + 1.0, 0.0], [2.0, 1.0]]])
  p_y1, agree = judge.preference_from_letters(logps)
  assert not agree[0]
  assert p_y1[0] == pytest.approx((_softmax2(3.0, 0) + _softmax2(1.0, 2.0)) / 2)
  assert 0.5 < p_y1[0] < _softmax2(3.0, 0.0)


@pytest.mark.parametrize("y1,y2,p,agree,parsed,want", [
    ("same", " same ", 0.9, True, True, (None, judge.IDENTICAL)),
    ("x", "y", 0.9, True, False, (None, judge.UNPARSABLE)),
    ("x", "y", 0.9, False, True, (None, judge.INCONSISTENT)),
    ("x", "y", 0.55, True, True, (None, judge.LOW_CONFIDENCE)),
    ("x", "y", 0.8, True, True, (0, None)),
    ("x", "y", 0.2, True, True, (1, None)),
])
def test_decide(y1, y2, p, agree, parsed, want):
  decision = judge.decide(y1, y2, p, agree, threshold=0.6, parsed=parsed)
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
def test_preference_from_verdicts(verdicts):
  p_y1, agree, parsed = judge.preference_from_verdicts(verdicts)
  for (first, second), p, a, ok in zip(verdicts, p_y1, agree, parsed):
    assert ok == (first is not None and second is not None)
    if ok:
      votes = [first == "A", second == "B"]
      assert p == sum(votes) / 2
      assert a == (votes[0] == votes[1])
