"""The run's report: `report.md` and PNG plots, rewritten after every iteration.

It reads only the iterations' summaries and artifacts, so it can be rebuilt
from a workdir at any time. Plots: pair yield and drop reasons, judge
confidence, lengths of chosen vs rejected responses, DPO rewards/margins and
accuracies, and evaluation accuracy when available.
"""
import collections
import pathlib

import matplotlib

matplotlib.use("Agg")
from matplotlib import figure as figure_lib  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from isr_dpo_jax import metrics as metrics_lib  # noqa: E402
from isr_dpo_jax import stages  # noqa: E402
from isr_dpo_jax.data import records  # noqa: E402

TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")


def train_summary(metrics_path: pathlib.Path) -> dict:
  """Mean of each key over the last quarter of the DPO steps (at least one)."""
  if not metrics_path.exists():
    return {}
  rows = metrics_lib.read_metrics(metrics_path)
  if not rows:
    return {}
  tail = rows[-max(1, len(rows) // 4):]
  return {k: float(np.mean([r[k] for r in tail])) for k in TRAIN_KEYS if k in tail[0]} | {
      "steps": len(rows)}


def scalars(summary: dict) -> dict[str, float]:
  """An iteration's numbers as flat scalars (metrics.jsonl, TensorBoard)."""
  out = {"pairs": summary["pairs"]}
  for stage in map(stages.Summary.from_dict, summary["stages"]):
    name = stage.stage
    out[f"{name}/records_out"] = stage.records_out
    if not stage.done_before():  # a resumed stage's time is not its own
      out[f"{name}/seconds"] = stage.seconds
    if stage.tokens and stage.seconds:
      out[f"{name}/{stage.token_kind}_tokens_per_second"] = stage.tokens / stage.seconds
    out |= {f"{name}/dropped/{reason}": n for reason, n in stage.dropped.items()}
  out |= {f"train/{k}": v for k, v in summary["train"].items()}
  if summary.get("eval"):
    out["eval/accuracy"] = _accuracy(summary["eval"])
  return out


def _pairs(workdir: pathlib.Path, t: int) -> list[dict]:
  path = workdir / f"iter_{t}" / "pairs.jsonl"
  return records.load_jsonl(path) if path.exists() else []


def _accuracy(rows: list[dict] | None) -> float | None:
  return rows[0]["accuracy"] if rows else None


def _iterations_axis(ax, its: list[int], label: str = "iteration") -> None:
  """An x axis of the iterations `its`: whole-number ticks, half a step of room."""
  ax.set_xlabel(label)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
  ax.set_xlim(min(its) - 0.5, max(its) + 0.5)


def _plot_yield(ax, summaries):
  reasons = sorted({r for s in summaries for r in _judge_stage(s)["dropped"]})
  its = [s["iteration"] for s in summaries]
  bottom = np.zeros(len(its))
  kept = np.array([s["pairs"] for s in summaries], float)
  ax.bar(its, kept, label="kept")
  bottom += kept
  for reason in reasons:
    counts = np.array([_judge_stage(s)["dropped"].get(reason, 0) for s in summaries], float)
    ax.bar(its, counts, bottom=bottom, label=reason)
    bottom += counts
  ax.set(title="pair yield", ylabel="prompts")
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  _iterations_axis(ax, its)


def _plot_confidence(ax, pairs: dict[int, list[dict]]) -> None:
  """One histogram per iteration, their bars side by side in each bin."""
  its = [t for t, ps in pairs.items() if ps]
  if its:
    ax.hist([[p["confidence"] for p in pairs[t]] for t in its], bins=10,
            range=(0.5, 1.0), label=[f"iter {t}" for t in its])
  ax.set(title="judge confidence of kept pairs", xlabel="P(winner)", ylabel="pairs")
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def _plot_eval(ax, summaries) -> None:
  """Accuracy of pi_t by t (pi_T after the last iteration), or why there is none."""
  evals = [(s["iteration"], _accuracy(s.get("eval"))) for s in summaries if s.get("eval")]
  if summaries and summaries[-1].get("eval_final"):
    evals.append((summaries[-1]["iteration"] + 1, _accuracy(summaries[-1]["eval_final"])))
  ax.set(title="eval accuracy of pi_t")
  if evals:
    ax.plot(*zip(*evals), marker="o")
    _iterations_axis(ax, [t for t, _ in evals], "t")
    return
  off = not any("eval" in s for s in summaries)
  ax.text(0.5, 0.5, "evaluation off\n(eval.enabled=False)" if off else
          "no evaluation results\n(eval.test_sets is empty)",
          ha="center", va="center", transform=ax.transAxes)
  ax.set(xticks=[], yticks=[])


def _judge_stage(summary: dict) -> dict:
  return next(s for s in summary["stages"] if s["stage"] == "judgments")


def figure(summaries: list[dict], pairs: dict[int, list[dict]]) -> figure_lib.Figure:
  """The report's plots of `summaries` and each iteration's kept `pairs`."""
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  _plot_yield(axes[0, 0], summaries)
  _plot_confidence(axes[0, 1], pairs)
  its = [s["iteration"] for s in summaries]
  for key in ("chosen_length", "rejected_length"):
    axes[0, 2].plot(its, [np.mean([p[key] for p in pairs[t]]) if pairs[t] else np.nan
                          for t in its], marker="o", label=key.split("_")[0])
  axes[0, 2].set(title="response length (tokens)")
  _iterations_axis(axes[0, 2], its)
  for ax, key in ((axes[1, 0], "rewards/margins"), (axes[1, 1], "rewards/accuracies")):
    ax.plot(its, [s["train"].get(key, np.nan) for s in summaries], marker="o")
    ax.set(title=f"DPO {key} (last quarter of steps)")
    _iterations_axis(ax, its)
  _plot_eval(axes[1, 2], summaries)
  for ax in axes.flat:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def write(workdir: pathlib.Path, summaries: list[dict]) -> pathlib.Path:
  """Writes report.md and report.png under `workdir`; returns the markdown path."""
  workdir = pathlib.Path(workdir)
  pairs = {s["iteration"]: _pairs(workdir, s["iteration"]) for s in summaries}
  fig = figure(summaries, pairs)
  fig.savefig(workdir / "report.png", dpi=80)
  plt.close(fig)
  path = workdir / "report.md"
  path.write_text(_markdown(summaries, pairs))
  return path


def _markdown(summaries: list[dict], pairs: dict[int, list[dict]]) -> str:
  lines = ["# ISR-DPO run report", "", "![plots](report.png)", "",
           "| iteration | eval acc of pi_t | pairs kept | dropped | chosen len | "
           "rejected len | DPO acc | DPO margin |", "|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    t, ps = s["iteration"], pairs[s["iteration"]]
    dropped = collections.Counter(_judge_stage(s)["dropped"])
    acc = _accuracy(s.get("eval"))
    lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
        t, "-" if acc is None else f"{acc:.3f}", s["pairs"],
        ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "-",
        f"{np.mean([p['chosen_length'] for p in ps]):.1f}" if ps else "-",
        f"{np.mean([p['rejected_length'] for p in ps]):.1f}" if ps else "-",
        _fmt(s["train"].get("rewards/accuracies")), _fmt(s["train"].get("rewards/margins"))))
  if summaries and summaries[-1].get("eval_final"):
    lines += ["", f"Final pi_{summaries[-1]['iteration'] + 1} eval accuracy: "
              f"{_accuracy(summaries[-1]['eval_final']):.3f}"]
  lines += ["", "## Stages", ""]
  for s in summaries:
    lines += [f"- iteration {s['iteration']} {stages.Summary.from_dict(stage).line()}"
              for stage in s["stages"]]
  return "\n".join(lines) + "\n"


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"
