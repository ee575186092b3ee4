"""Scores of answered test sets: judge aggregates, answer matching, lengths."""
import dataclasses
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from isr_dpo_jax.eval import protocols
from isr_dpo_jax.eval import test_sets

# (prediction, ground-truth answer) -> whether the free-text prediction gives
# the answer; e.g. world.scenes.answer_is_correct for the synthetic world.
Checker = Callable[[str, str], bool]


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
  """Accuracy and mean score over the parsed judge replies only."""
  accuracy: float | None  # share judged correct, or accepted by a checker
  mean_score: float | None  # None without a judge
  parsed: int
  parse_failures: int


def summarize_verdicts(verdicts: Sequence[protocols.Verdict]) -> ScoreSummary:
  """Accuracy over the verdicts given, mean over the scores given.

  A reply without a verdict or without a score is a parse failure, counted
  beside the results, never a "no" or a 1.
  """
  correct = [v.correct for v in verdicts if v.correct is not None]
  scores = [v.score for v in verdicts if v.score is not None]
  failures = sum(v.correct is None or v.score is None for v in verdicts)
  return ScoreSummary(
      accuracy=float(np.mean(correct)) if correct else None,
      mean_score=float(np.mean(scores)) if scores else None,
      parsed=len(verdicts) - failures, parse_failures=failures)


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalize_answer(text: str) -> str:
  """Lower case, without punctuation, articles and extra whitespace (SQuAD)."""
  text = _ARTICLES_RE.sub(" ", text.lower().translate(_PUNCTUATION))
  return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


def keyword_match(prediction: str, answer: str) -> bool:
  """True when every word of the normalised answer is in the prediction.

  Covers exact matches and short answers embedded in a sentence ("red" in
  "The ball is red."). The default checker until a task brings its own.
  """
  answer_words = set(normalize_answer(answer).split())
  return bool(answer_words) and answer_words <= set(
      normalize_answer(prediction).split())


def match_accuracy(records: Sequence[test_sets.QARecord],
                   predictions: Sequence[str],
                   checker: Checker = keyword_match) -> float | None:
  """Share of predictions the checker accepts."""
  if not records:
    return None
  return float(np.mean([checker(p, r.answer) for r, p in zip(
      records, predictions, strict=True)]))


@dataclasses.dataclass(frozen=True)
class LengthStats:
  mean: float
  median: float
  p90: float


def length_stats(lengths: Sequence[int]) -> LengthStats | None:
  """Mean, median and 90th percentile (linear interpolation) of lengths."""
  if not lengths:
    return None
  lengths = np.asarray(lengths, dtype=np.float64)
  return LengthStats(mean=float(np.mean(lengths)),
                     median=float(np.median(lengths)),
                     p90=float(np.percentile(lengths, 90)))


def word_counts(texts: Sequence[str]) -> list[int]:
  return [len(text.split()) for text in texts]


def token_counts(texts: Sequence[str], tokenizer) -> list[int]:
  """Token counts under a Hugging Face tokenizer, without special tokens."""
  if not texts:
    return []
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  return [len(row) for row in ids]
