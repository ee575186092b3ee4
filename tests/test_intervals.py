"""The demo's intervals against independent references."""
import numpy as np
import pytest
from scipy import stats

from isr_dpo_jax import intervals


def test_paired_difference_counts_only_changed_scores():
  # 10 questions: 3 gained, 1 lost, 6 the same.
  before = [False] * 3 + [True] + [True] * 4 + [False] * 2
  after = [True] * 3 + [False] + [True] * 4 + [False] * 2
  estimate = intervals.paired_difference(before, after)
  # By hand: d = (3 - 1) / 10; var(d) = (b + c - (b - c)^2 / n) / n^2.
  spread = 1.959963984540054 * np.sqrt(3 + 1 - 4 / 10) / 10
  assert estimate.n == 10
  np.testing.assert_allclose([estimate.value, estimate.low, estimate.high],
                             [0.2, 0.2 - spread, 0.2 + spread], rtol=1e-12)


def test_paired_difference_matches_a_paired_bootstrap():
  """1,236 questions as in the demo: the closed form against 20,000 paired
  resamples of the same questions (the percentile interval)."""
  rng = np.random.default_rng(0)
  before = rng.random(1236) < 0.44
  after = np.where(rng.random(1236) < 0.15, ~before, before) | (rng.random(1236) < 0.03)
  estimate = intervals.paired_difference(before.tolist(), after.tolist())
  picks = rng.integers(0, 1236, size=(20_000, 1236))
  diffs = after[picks].mean(1) - before[picks].mean(1)
  low, high = np.percentile(diffs, [2.5, 97.5])
  assert estimate.value == pytest.approx(after.mean() - before.mean())
  # The bootstrap's own noise at 20,000 resamples is about 0.001.
  np.testing.assert_allclose([estimate.low, estimate.high], [low, high], atol=0.003)


def test_paired_difference_is_narrower_than_independent_samples():
  rng = np.random.default_rng(1)
  before = rng.random(1000) < 0.5
  after = np.where(rng.random(1000) < 0.1, ~before, before)
  paired = intervals.paired_difference(before.tolist(), after.tolist())
  p1, p2 = before.mean(), after.mean()
  independent = 1.96 * np.sqrt(p1 * (1 - p1) / 1000 + p2 * (1 - p2) / 1000)
  assert paired.high - paired.low < independent


def test_paired_difference_needs_the_same_questions():
  with pytest.raises(ValueError, match="equally many"):
    intervals.paired_difference([True, False], [True])


def test_mean_is_the_normal_interval_and_matches_a_bootstrap():
  """Judge scores as in the demo (0, 0.5 or 1 per pair, 300 pairs): the closed
  form against scipy's normal interval and 20,000 bootstrap resamples."""
  rng = np.random.default_rng(1)
  scores = rng.choice([0.0, 0.5, 1.0], size=300, p=[0.2, 0.5, 0.3])
  estimate = intervals.mean(scores.tolist())
  reference = stats.norm.interval(0.95, loc=scores.mean(), scale=stats.sem(scores))
  assert estimate.n == 300 and estimate.value == pytest.approx(scores.mean(), rel=1e-12)
  np.testing.assert_allclose([estimate.low, estimate.high], reference, rtol=1e-9)
  means = rng.choice(scores, size=(20_000, 300)).mean(axis=1)
  np.testing.assert_allclose([estimate.low, estimate.high],
                             np.percentile(means, [2.5, 97.5]), atol=0.006)


def test_mean_of_nothing_is_none_and_of_one_value_has_no_spread():
  assert intervals.mean([]) is None
  assert intervals.mean([0.5]) == intervals.Estimate(0.5, 0.5, 0.5, 1)
