"""The run's report: `report.md` and PNG plots, rewritten after every iteration.

It reads only the iterations' summaries and artifacts, so it can be rebuilt
from a workdir at any time. Plots: pair yield and drop reasons, judge
confidence, lengths of chosen vs rejected responses, DPO rewards/margins and
accuracies, and evaluation accuracy when available.
"""
import collections
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")


def train_summary(metrics_path: pathlib.Path) -> dict:
  """Mean of each key over the last quarter of the DPO steps (at least one)."""
  if not metrics_path.exists():
    return {}
  by_step = {r["step"]: r for r in map(json.loads, metrics_path.open())}
  rows = [by_step[s] for s in sorted(by_step)]
  if not rows:
    return {}
  tail = rows[-max(1, len(rows) // 4):]
  return {k: float(np.mean([r[k] for r in tail])) for k in TRAIN_KEYS if k in tail[0]} | {
      "steps": len(rows)}


def scalars(summary: dict) -> dict[str, float]:
  """An iteration's numbers as flat scalars (metrics.jsonl, TensorBoard)."""
  out = {"pairs": summary["pairs"]}
  for stage in summary["stages"]:
    name = stage["stage"]
    out[f"{name}/records_out"] = stage["records_out"]
    out[f"{name}/seconds"] = stage["seconds"]
    if stage["tokens"] and stage["seconds"]:
      out[f"{name}/tokens_per_second"] = stage["tokens"] / stage["seconds"]
    out |= {f"{name}/dropped/{reason}": n for reason, n in stage["dropped"].items()}
  out |= {f"train/{k}": v for k, v in summary["train"].items()}
  if summary.get("eval"):
    out["eval/accuracy"] = _accuracy(summary["eval"])
  return out


def _pairs(workdir: pathlib.Path, t: int) -> list[dict]:
  path = workdir / f"iter_{t}" / "pairs.jsonl"
  return [json.loads(line) for line in path.open()] if path.exists() else []


def _accuracy(rows: list[dict] | None) -> float | None:
  return rows[0]["accuracy"] if rows else None


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
  ax.set(title="pair yield", xlabel="iteration", ylabel="prompts")
  ax.legend(fontsize=7)


def _judge_stage(summary: dict) -> dict:
  return next(s for s in summary["stages"] if s["stage"] == "judgments")


def write(workdir: pathlib.Path, summaries: list[dict]) -> pathlib.Path:
  """Writes report.md and report.png under `workdir`; returns the markdown path."""
  workdir = pathlib.Path(workdir)
  pairs = {s["iteration"]: _pairs(workdir, s["iteration"]) for s in summaries}
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  _plot_yield(axes[0, 0], summaries)
  for t, ps in pairs.items():
    if ps:
      axes[0, 1].hist([p["confidence"] for p in ps], bins=20, range=(0.5, 1.0),
                      histtype="step", label=f"iter {t}")
  axes[0, 1].set(title="judge confidence of kept pairs", xlabel="P(winner)")
  its = [s["iteration"] for s in summaries]
  for key in ("chosen_length", "rejected_length"):
    axes[0, 2].plot(its, [np.mean([p[key] for p in pairs[t]]) if pairs[t] else np.nan
                          for t in its], marker="o", label=key.split("_")[0])
  axes[0, 2].set(title="response length (tokens)", xlabel="iteration")
  for ax, key in ((axes[1, 0], "rewards/margins"), (axes[1, 1], "rewards/accuracies")):
    ax.plot(its, [s["train"].get(key, np.nan) for s in summaries], marker="o")
    ax.set(title=f"DPO {key} (last quarter of steps)", xlabel="iteration")
  evals = [(s["iteration"], _accuracy(s.get("eval"))) for s in summaries if s.get("eval")]
  if summaries and summaries[-1].get("eval_final"):
    evals.append((summaries[-1]["iteration"] + 1, _accuracy(summaries[-1]["eval_final"])))
  if evals:
    axes[1, 2].plot(*zip(*evals), marker="o")
  axes[1, 2].set(title="eval accuracy of pi_t", xlabel="t")
  for ax in axes.flat:
    if ax.get_legend_handles_labels()[0] and ax is not axes[0, 0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
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
    for stage in s["stages"]:
      lines.append(f"- iteration {s['iteration']} {stage['stage']}: {stage['records_in']} in, "
                   f"{stage['records_out']} out, dropped {stage['dropped'] or 'none'}, "
                   f"{stage['seconds']:.1f}s")
  return "\n".join(lines) + "\n"


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"
