"""The judge prompt and the score parser, against the protocol's grammar."""
import collections
import statistics
import string

from hypothesis import given, settings, strategies as st
import pytest

from isr_dpo_jax.eval import judge_prompt

# Filler words hold no digits and no ':', so they never form a number or a
# "Score: N" line; numbers are joined to them by spaces (word-delimited).
_FILLER = st.text(alphabet=string.ascii_letters + ",.!?;'()-*\n", min_size=1,
                  max_size=12)
_NUMBER = st.one_of(
    st.integers(0, 100).map(str),
    st.tuples(st.integers(0, 9), st.integers(0, 99)).map(
        lambda ab: f"{ab[0]}.{ab[1]}"))


def _join(tokens):
  return " ".join(tokens)


@given(prefix=st.lists(_FILLER, max_size=6), score=_NUMBER,
       suffix=st.lists(st.one_of(_FILLER, _NUMBER), max_size=8))
@settings(max_examples=150, deadline=None)
def test_score_line_wins(prefix, score, suffix):
  reply = _join(prefix + ["Explanation: fine.\nScore: " + score] + suffix)
  assert judge_prompt.parse_score(reply) == float(score)


@given(tokens=st.lists(st.one_of(_FILLER.map(lambda w: ("w", w)),
                                 _NUMBER.map(lambda n: ("n", n))),
                       min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_without_score_line_most_frequent_number_ties_averaged(tokens):
  reply = _join(text for _, text in tokens)
  numbers = [float(text) for kind, text in tokens if kind == "n"]
  if not numbers:
    assert judge_prompt.parse_score(reply) is None
    return
  counts = collections.Counter(numbers)
  top = max(counts.values())
  expected = statistics.fmean(v for v, c in counts.items() if c == top)
  assert judge_prompt.parse_score(reply) == pytest.approx(expected)


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",))))
@settings(max_examples=100, deadline=None)
def test_no_digits_is_a_parse_failure_not_a_one(reply):
  assert judge_prompt.parse_score(reply) is None


@pytest.mark.parametrize("reply, score", [
    ("Explanation: correct and clear.\nScore: 4", 4.0),
    ("Explanation: partly.\nScore: 2.5", 2.5),
    ("Score: 5\nScore: 1", 5.0),  # the first "Score: N"
    ("score: 4, I rate it 4 of 5", 4.0),  # lower case: most frequent number
    ("I'd rate it 3 out of 5.", 4.0),  # a tie is averaged, as published
    ("Explanation: the answer is wrong.", None),
])
def test_parse_score_examples(reply, score):
  assert judge_prompt.parse_score(reply) == score


def test_prompt_fills_fields_and_cuts_prediction_to_256_words():
  long_prediction = " ".join(f"w{i}" for i in range(300))
  prompt = judge_prompt.judge_prompt(
      caption="A man slices bread.", question="What does he cut?",
      answer="Bread.", prediction=long_prediction)
  assert prompt.startswith("Given the following inputs:\n\n"
                           "1. **Ground Truth Video Caption**: A man slices "
                           "bread.\n")
  assert "2. **Question Related to the Caption**: What does he cut?\n" in prompt
  assert "3. **Ground Truth Answer**: Bread.\n" in prompt
  kept = " ".join(f"w{i}" for i in range(256))
  assert f"4. **Model Predicted Answer**: {kept}\n" in prompt
  assert "w256" not in prompt
  assert prompt.endswith("Score: <an integer score of quality from 1-5>")


def test_short_prediction_is_kept_verbatim():
  prediction = "Bread,\n  then  {cheese}."
  assert judge_prompt.truncate_words(prediction) == prediction
  prompt = judge_prompt.judge_prompt(caption="c", question="q", answer="a",
                                     prediction=prediction)
  assert f"**Model Predicted Answer**: {prediction}\n" in prompt
