"""95% intervals for the demo's numbers: paired accuracy differences and means.

Both are closed forms (no resampling), so a report's intervals are the same
on every machine that produced the same answers.
"""
import dataclasses
import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A value, its 95% interval [low, high] and the count it rests on."""
  value: float
  low: float
  high: float
  n: int

  def __str__(self) -> str:
    return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_difference(before: Sequence[bool], after: Sequence[bool]) -> Estimate:
  """Accuracy of `after` minus that of `before`, scored on the same questions.

  The Wald interval of a difference of paired proportions (the one that goes
  with McNemar's test): only the questions whose score changed move it, so it
  is much narrower than the interval of two independent accuracies.
  """
  if len(before) != len(after) or not before:
    raise ValueError(f"need equally many scores, not {len(before)} and {len(after)}")
  n = len(before)
  gained = sum(1 for b, a in zip(before, after) if a and not b)
  lost = sum(1 for b, a in zip(before, after) if b and not a)
  value = (gained - lost) / n
  spread = Z95 * math.sqrt(gained + lost - (gained - lost) ** 2 / n) / n
  return Estimate(value, value - spread, value + spread, n)


def mean(values: Sequence[float]) -> Estimate | None:
  """The mean of i.i.d. bounded values with its normal (CLT) interval,
  mean +- z * s / sqrt(n), s the sample standard deviation; None when empty.

  For a few hundred values in [0, 1], as the demo's judge scores are, the
  normal approximation is close (tests check it against a bootstrap).
  """
  n = len(values)
  if n == 0:
    return None
  value = math.fsum(values) / n
  variance = math.fsum((v - value) ** 2 for v in values) / max(n - 1, 1)
  spread = Z95 * math.sqrt(variance / n)
  return Estimate(value, value - spread, value + spread, n)
