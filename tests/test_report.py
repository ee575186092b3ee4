"""report.png's plots, read from matplotlib's objects rather than pixels."""
import itertools

from matplotlib import pyplot as plt
import pytest

from isr_dpo_jax import report
from isr_dpo_jax import stages


def _summary(t: int, evaluated: bool) -> dict:
  judged = stages.Summary("judgments", records_in=12, records_out=8 + t,
                          dropped={"low_confidence": 4 - t})
  summary = dict(iteration=t, pairs=8 + t, stages=[judged.as_dict()],
                 train={"rewards/margins": 0.1 * t, "rewards/accuracies": 0.5})
  if evaluated:
    summary["eval"] = [dict(accuracy=0.3 + 0.1 * t)]
  return summary


def _pairs(t: int) -> list[dict]:
  return [dict(confidence=0.5 + 0.49 * ((7 * i + t) % 10) / 10, chosen_length=10 + t,
               rejected_length=12) for i in range(8 + t)]


def _figure(iterations: int, evaluated: bool):
  summaries = [_summary(t, evaluated) for t in range(iterations)]
  fig = report.figure(summaries, {t: _pairs(t) for t in range(iterations)})
  axes = {ax.get_title(): ax for ax in fig.axes}
  plt.close(fig)
  return axes


@pytest.mark.parametrize("iterations", [1, 3, 9])
def test_iteration_axes_tick_whole_numbers(iterations):
  axes = _figure(iterations, evaluated=True)
  by_iteration = [ax for ax in axes.values() if ax.get_xlabel() in ("iteration", "t")]
  assert len(by_iteration) == 5
  for ax in by_iteration:
    low, high = ax.get_xlim()
    ticks = [x for x in ax.get_xticks() if low <= x <= high]
    assert ticks and all(float(x).is_integer() for x in ticks), (ax.get_title(), ticks)


def test_the_iterations_confidence_histograms_do_not_cover_each_other():
  ax = _figure(3, evaluated=False)["judge confidence of kept pairs"]
  bars = [[(bar.get_x(), bar.get_x() + bar.get_width()) for bar in container
           if bar.get_height() > 0] for container in ax.containers]
  assert len(bars) == 3 and all(bars)  # one filled histogram per iteration
  for a, b in itertools.combinations(bars, 2):
    for (a0, a1), (b0, b1) in itertools.product(a, b):  # bars may touch
      assert min(a1, b1) - max(a0, b0) < 1e-6 * (a1 - a0), ((a0, a1), (b0, b1))


@pytest.mark.parametrize("evaluated", [False, True])
def test_the_evaluation_panel_says_when_evaluation_is_off(evaluated):
  ax = _figure(2, evaluated)["eval accuracy of pi_t"]
  said = [text.get_text() for text in ax.texts]
  if evaluated:
    assert not said and len(ax.lines[0].get_xdata()) == 2
  else:
    assert said == ["evaluation off\n(eval.enabled=False)"]
