"""The demo's numbers: summary.json, the terminal table, report.md and report.png.

Accuracy is exact match of greedy answers on the held-out questions, scored
by the world's rule (scenes.answer_is_correct). Every arm starts from the
same pi_0, so an arm's change against SFT is a paired comparison on the same
questions, given with its 95% interval (intervals.paired_difference). Judge
agreement: over an iteration's judged pairs where exactly one of the two
sampled answers is correct, the judge's preference for that one (its P(y1
better) averaged over both orders, or 1 minus it), averaged: 1 picks the
right answer in both orders, 0.5 is chance (a judge that always says "A").
It counts every such pair, kept or not, with the interval of a mean; an
arm's agreement pools its iterations.
"""
import json
import pathlib
import platform

import matplotlib
import numpy as np

from isr_dpo_jax import intervals
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


def summarize(workdir: pathlib.Path, config, world, arms: list[str],
              timings: dict[str, float]) -> dict:
  """Per arm: pi_0's and each pi_t's held-out scores, against pi_0's, and
  what each iteration's judge did."""
  test_answers = _answers(world.test_sets[0])
  prompt_answers = _answers(config.data.prompts)
  first = workdir / arms[0]
  sft = _correct(first / "iter_0" / "eval", test_answers)
  summary = dict(seed=config.seed, machine=_machine(), questions=len(sft),
                 sft=dict(accuracy=float(np.mean(list(sft.values()))),
                          answer_length=_answer_length(first / "iter_0")),
                 arms={})
  for arm in arms:
    arm_dir = workdir / arm
    its, scores = [], []
    for t in range(config.iterations):
      it_dir = arm_dir / f"iter_{t}"
      after = (arm_dir / f"iter_{t + 1}" / "eval" if t + 1 < config.iterations
               else it_dir / "eval_final")
      correct = _correct(after, test_answers)
      summary_t = json.loads((it_dir / "summary.json").read_text())
      its.append(dict(
          iteration=t + 1, accuracy=float(np.mean(list(correct.values()))),
          change=_estimate(intervals.paired_difference(
              [sft[i] for i in sorted(sft)], [correct[i] for i in sorted(sft)])),
          answer_length=_answer_length(after.parent, after.name),
          **_judging(it_dir, prompt_answers, scores), pairs_kept=summary_t["pairs"],
          seconds=_stage_seconds(it_dir, summary_t)))
    summary["arms"][arm] = dict(seconds=timings.get(arm), iterations=its,
                                judge_agreement=_estimate(intervals.mean(scores)))
  return summary


def _answers(path) -> dict[str, str]:
  return {r["id"]: records.conversation_turns(r["conversations"])[0][1]
          for r in records.load_jsonl(path)}


def _correct(eval_dir: pathlib.Path, answers: dict[str, str]) -> dict[str, bool]:
  """Question id -> whether the greedy answer in eval_dir is right."""
  [predictions] = eval_dir.glob("*/predictions.jsonl")
  return {r["id"]: scenes.answer_is_correct(r["prediction"], answers[r["id"]])
          for r in records.load_jsonl(predictions)}


def _answer_length(it_dir: pathlib.Path, name: str = "eval") -> float:
  """Mean tokens of the greedy answers (from the evaluation's own table)."""
  [row] = records.load_jsonl(it_dir / name / "results.jsonl")
  return row["tokens"]["mean"]


def _judging(it_dir: pathlib.Path, answers: dict[str, str], scores: list[float]) -> dict:
  """The sampled answers' accuracy, and the judge's agreement on the pairs
  with one correct answer; appends its scores of those pairs to `scores`."""
  responses = {r["id"]: r for r in records.load_jsonl(it_dir / "responses.jsonl")}
  correct = {i: [scenes.answer_is_correct(y, answers[i]) for y in r["responses"]]
             for i, r in responses.items()}
  found = [j["p_y1"] if correct[j["id"]][0] else 1 - j["p_y1"]
           for j in records.load_jsonl(it_dir / "judgments.jsonl")
           if len(set(correct[j["id"]])) == 2]
  scores += found
  return dict(response_accuracy=float(np.mean([c for cs in correct.values() for c in cs])),
              pairs_one_correct=len(found), judge_agreement=_estimate(intervals.mean(found)))


def _stage_seconds(it_dir: pathlib.Path, summary: dict) -> dict:
  """Seconds of the sampling and judging stages (from the iteration's
  summary) and of the DPO steps."""
  seconds = {s["stage"]: s["seconds"] for s in summary["stages"]}
  metrics = it_dir / "train" / "metrics.jsonl"
  rows = metrics_lib.read_metrics(metrics) if metrics.exists() else []
  seconds["dpo"] = sum(r["tokens"] / r["tokens_per_second"] for r in rows)
  return seconds


def _estimate(estimate: intervals.Estimate | None) -> dict | None:
  return None if estimate is None else dict(
      value=estimate.value, low=estimate.low, high=estimate.high, n=estimate.n)


def _machine() -> str:
  import os  # pylint: disable=g-import-not-at-top
  return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


# The table.


def _interval(e: dict | None, signed: bool = True) -> str:
  if e is None:
    return "-"
  f = "{:+.3f}" if signed else "{:.2f}"
  return f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]"


def table(summary: dict) -> str:
  """The terminal table: accuracy by iteration, the last one's change against
  SFT with its 95% interval, and the judge's agreement with its interval."""
  arms = summary["arms"]
  n = len(next(iter(arms.values()))["iterations"])
  head = (f"{'arm':18s} {'SFT':>6s}" + "".join(f" {'it' + str(t + 1):>6s}" for t in range(n))
          + f"  {'it' + str(n) + ' - SFT [95% CI]':25s} {'judge agrees [95% CI]':22s}"
          + f" {'pairs':>6s} {'min':>5s}")
  lines = [head]
  for name, arm in arms.items():
    its = arm["iterations"]
    agree = arm["judge_agreement"]
    agree_text = _interval(agree, signed=False) + (f" n={agree['n']}" if agree else "")
    lines.append(
        f"{name:18s} {summary['sft']['accuracy']:6.3f}"
        + "".join(f" {i['accuracy']:6.3f}" for i in its)
        + f"  {_interval(its[-1]['change']):25s}"
        + f" {agree_text:22s}"
        + f" {sum(i['pairs_kept'] for i in its):6d}"
        + f" {(arm['seconds'] or 0) / 60:5.1f}")
  lines.append(f"({summary['questions']} held-out questions, seed {summary['seed']}; "
               "pairs: kept over all iterations; min: the arm's wall minutes)")
  return "\n".join(lines)


# report.md and report.png.


def write(workdir: pathlib.Path, summary: dict) -> pathlib.Path:
  """report.md (the table, then every iteration) and report.png."""
  _plot(workdir / "report.png", summary)
  lines = ["# ISR-DPO demo on the synthetic video world", "", "![plots](report.png)", "",
           "```", table(summary), "```", "",
           "Accuracy: exact match of greedy answers on the held-out questions. "
           "Changes against SFT: paired differences on the same questions, with "
           "their 95% interval. Judge agreement: the judge's preference for the "
           "correct answer, averaged over both orders and over every pair with "
           "exactly one correct answer (0.5 is chance; 95% interval; n such pairs "
           "over all iterations).", "", "## Per iteration", "",
           "| arm | t | accuracy of pi_t | change vs SFT [95% CI] | answer len "
           "| sampled acc | judge agreement [95% CI] | one-correct pairs | pairs kept "
           "| seconds by stage |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, arm in summary["arms"].items():
    for i in arm["iterations"]:
      stages = ", ".join(f"{k} {v:.0f}" for k, v in i["seconds"].items())
      lines.append(
          f"| {name} | {i['iteration']} | {i['accuracy']:.3f} | {_interval(i['change'])} | "
          f"{i['answer_length']:.1f} | {i['response_accuracy']:.3f} | "
          f"{_interval(i['judge_agreement'], signed=False)} | {i['pairs_one_correct']} | "
          f"{i['pairs_kept']} | {stages} |")
  lines += ["", f"Machine: {summary['machine']}. Each arm's own report: "
            + ", ".join(f"[{a}]({a}/report.md)" for a in summary["arms"]), ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path


def _plot(path: pathlib.Path, summary: dict) -> None:
  """Accuracy change against SFT and judge agreement per iteration, with
  their 95% intervals as error bars; answer length and pairs kept."""
  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  for k, (name, arm) in enumerate(summary["arms"].items()):
    its = arm["iterations"]
    ts = np.array([i["iteration"] for i in its]) + 0.06 * (k - 1.5)  # side by side
    change = [i["change"] for i in its]
    axes[0].errorbar(ts, [c["value"] for c in change],
                     yerr=[[c["value"] - c["low"] for c in change],
                           [c["high"] - c["value"] for c in change]],
                     marker="o", capsize=3, label=name)
    shown = [(t, i["judge_agreement"]) for t, i in zip(ts, its)
             if i["judge_agreement"] is not None]
    if shown:
      axes[1].errorbar([t for t, _ in shown], [a["value"] for _, a in shown],
                       yerr=[[a["value"] - a["low"] for _, a in shown],
                             [a["high"] - a["value"] for _, a in shown]],
                       marker="o", capsize=3, label=name)
    axes[2].plot([0] + [i["iteration"] for i in its],
                 [summary["sft"]["answer_length"]] + [i["answer_length"] for i in its],
                 marker="o", label=name)
    axes[3].plot([i["iteration"] for i in its], [i["pairs_kept"] for i in its],
                 marker="o", label=name)
  axes[0].axhline(0, color="grey", lw=0.8)
  axes[1].axhline(0.5, color="grey", lw=0.8)  # chance
  titles = ("held-out accuracy of pi_t minus SFT's (95% CI)",
            "judge agreement with the truth (95% CI)",
            "held-out answer length (tokens; t=0: SFT)", "pairs kept")
  n = len(next(iter(summary["arms"].values()))["iterations"])
  for ax, title in zip(axes, titles):
    ax.set(title=title, xlabel="iteration t")
    ax.set_xticks(range(0 if ax is axes[2] else 1, n + 1))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
