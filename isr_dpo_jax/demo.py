"""The built-in experiment: `isr-dpo demo` (what `make demo` runs).

On the synthetic video world (data/synthetic.py), in `<workdir>/`:
  world/, init/           the world's videos and jsonl files; a random model
  align/                  SFT stage 1, captions only -> align/model
  sft/                    SFT stage 2, the mix -> sft/model = pi_0 of every arm
  isr_dpo/                ISR-DPO iterations (iterate.py), judge with context
  no_context/             the same, the judge denied the context
  no_retrospection/       the same, each context written from scratch
  summary.json, report.md accuracy, answer length, judge agreement, pair yield
                          and wall times per arm and iteration; report.png

SFT has LLaVA's two stages. Stage 1 (alignment) trains on one caption per
training clip, nothing else: the model is random, and captions are the
densest signal that makes it read the video (in the mix, the text prior of
the long examples wins and the model stays blind). The tower stays frozen in
both stages, as LLaVA's is: a random tower trained at the LM's learning rate
inflates its response to the white background until its layer norm drowns
the shapes. Stage 2's mix keeps the model imperfect at QA (a small share of
the QA pairs, every description) and teaches it the two skills the loop asks
of a model that a real LLM brings from its own instruction tuning: judging
two answers (some examples with the ground-truth description as context,
the others without) and revising an earlier description that has an error
in it.

The judge is generative and judges step by step: "red: yes. blue: no.
Answer A" says, for each response's answer word, whether the description
(or, without one, the video) shows it, then names the response. A one-letter
verdict is beyond this model: the letter depends on which response holds
which word, and its loss stayed at chance through 550 judge-only steps with
the true description shown, whereas each step of the written verdict is
learnt on its own (copy a word, look it up, compare two yes/no).

Judge agreement: among the kept pairs of an iteration where exactly one of
the two answers is correct, the share whose chosen answer is the correct one.
Reruns continue where a killed run stopped (every phase resumes).
"""
import json
import logging
import pathlib
import re
import time

import matplotlib
import ml_collections
import numpy as np
import tqdm

from isr_dpo_jax import bootstrap
from isr_dpo_jax import iterate
from isr_dpo_jax import judge
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax import settings
from isr_dpo_jax import sft
from isr_dpo_jax.data import records
from isr_dpo_jax.data import synthetic

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

# Arm name -> config overrides (the paper's ablations), all from the SFT model.
ARMS = {
    "isr_dpo": {},
    "no_context": {"self_judge.use_context": False},
    "no_retrospection": {"self_judge.retrospective": False},
}


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  summary = run(config, workdir)
  print(table(summary))
  print(f"report: {pathlib.Path(workdir) / 'report.md'}")


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """SFT, then every arm's iterations; writes and returns the summary."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  world = bootstrap.prepare(config, workdir)
  ground_truth = workdir / "world" / "ground_truth.jsonl"
  timings_path = workdir / "timings.json"
  timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
  phases = ["align", "sft", *ARMS]
  with tqdm.tqdm(phases, desc="demo", unit="phase") as bar:
    for phase in bar:
      bar.set_postfix_str(phase)
      if phase in timings:
        continue
      clock = time.perf_counter()
      if phase == "align":
        captions = write_captions(ground_truth, workdir / "align_data.jsonl")
        sft.run(sft_config(config, world, captions, world.init_checkpoint,
                           config.demo.align), workdir / "align")
      elif phase == "sft":
        mix = write_sft_mix(ground_truth, settings.prompts(config),
                            config.demo, config.seed, workdir / "sft_data.jsonl")
        sft.run(sft_config(config, world, mix, workdir / "align" / "model"),
                workdir / "sft")
      else:
        iterate.run(arm_config(config, world, workdir, ARMS[phase]), workdir / phase)
      timings[phase] = time.perf_counter() - clock
      timings_path.write_text(json.dumps(timings, indent=1))
  answers = {r["id"]: records.conversation_turns(r["conversations"])[0][1]
             for r in records.load_jsonl(world.prompts)}
  summary = summarize(workdir, config.iterations, answers, timings)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  write_report(workdir, summary)
  return summary


# The SFT data.


def _record(clip: dict, question: str, answer: str, index: int) -> dict:
  return {"id": f"{clip['id']}_sft{index}", "video": clip["video"],
          "conversations": synthetic.turns(question, answer)}


def _training_clips(ground_truth: pathlib.Path, limit: int | None = None) -> list[dict]:
  clips = [c for c in records.load_jsonl(ground_truth) if c["split"] == "train"]
  return clips[:limit]


def write_captions(ground_truth: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """Stage 1's data: one caption record per training clip."""
  clips = _training_clips(ground_truth)
  records.write_jsonl(path, [_record(c, synthetic.CAPTION_PROMPT, c["caption"], i)
                             for i, c in enumerate(clips)])
  return path


def write_sft_mix(ground_truth: pathlib.Path, prompts: judge.Prompts, cfg,
                  seed: int, path: pathlib.Path) -> pathlib.Path:
  """Stage 2's instruction records, on the first `cfg.mix_clips` training
  clips (see the module doc)."""
  rng = np.random.default_rng(seed)
  out = []

  def add(clip, question, answer):
    out.append(_record(clip, question, answer, len(out)))

  for clip in _training_clips(ground_truth, cfg.mix_clips):
    add(clip, prompts.first_context, clip["description"])
    if rng.random() < cfg.revision_share:
      add(clip, judge.context_question(prompts, corrupt(clip["description"], rng)),
          clip["description"])
    for qa in clip["qa"]:
      if rng.random() < cfg.qa_share:
        add(clip, qa["question"], qa["response"])
      if rng.random() < cfg.judge_share:
        add(clip, *judge_example(clip, qa, prompts, cfg.judge_context_share, rng))
  records.write_jsonl(path, out)
  return path


def corrupt(text: str, rng: np.random.Generator) -> str:
  """`text` with one world word (colour, shape, count, ...) replaced by another."""
  spots = [m for m in re.finditer(r"[a-z]+", text) if synthetic.alternatives(m[0])]
  spot = spots[rng.integers(len(spots))]
  wrong = rng.choice(synthetic.alternatives(spot[0]))
  return text[:spot.start()] + wrong + text[spot.end():]


def judge_example(clip: dict, qa: dict, prompts: judge.Prompts, context_share: float,
                  rng: np.random.Generator) -> tuple[str, str]:
  """A judge question between the true response and a wrong one, and its
  step-by-step verdict (see the module doc)."""
  wrong_word = str(rng.choice(synthetic.alternatives(qa["answer"])))
  wrong = re.sub(rf"\b{qa['answer']}\b", wrong_word, qa["response"])
  context = clip["description"] if rng.random() < context_share else None
  true_first = bool(rng.random() < 0.5)
  a, b = (qa["response"], wrong) if true_first else (wrong, qa["response"])
  words = (qa["answer"], wrong_word) if true_first else (wrong_word, qa["answer"])
  return (judge.judge_question(prompts, qa["question"], a, b, context),
          verdict(clip["description"], *words, "A" if true_first else "B"))


def verdict(description: str, word_a: str, word_b: str, letter: str) -> str:
  """"red: yes. blue: no. Answer A": whether the description shows each
  response's answer word, then the true response's letter."""
  shown = lambda word: "yes" if synthetic.mentions(description.lower(), word) else "no"
  return f"{word_a}: {shown(word_a)}. {word_b}: {shown(word_b)}. Answer {letter}"


# Configs of the phases.


def sft_config(config, world: bootstrap.Setup, data: pathlib.Path,
               checkpoint: pathlib.Path, overrides=None):
  """An SFT stage on `data` from `checkpoint`; `overrides` of config.sft."""
  c = config.copy_and_resolve_references()
  c.world = None
  c.model.checkpoint = str(checkpoint)
  c.sft.data = str(data)
  c.sft.update(overrides or {})
  c.data.video_root = str(world.video_root)
  return c


def arm_config(config, world: bootstrap.Setup, workdir: pathlib.Path, overrides: dict):
  c = config.copy_and_resolve_references()
  c.world = None
  c.model.checkpoint = str(workdir / "sft" / "model")
  c.data.prompts = str(world.prompts)
  c.data.video_root = str(world.video_root)
  c.eval.test_sets = list(world.test_sets)
  c.update_from_flattened_dict(overrides)
  return c


# Numbers.


def summarize(workdir: pathlib.Path, iterations: int, answers: dict[str, str],
              timings: dict[str, float]) -> dict:
  """Per arm: pi_0 (SFT) and, per iteration t, what it did and pi_{t+1}'s score."""
  arms = {}
  for arm in ARMS:
    its = [json.loads((workdir / arm / f"iter_{t}" / "summary.json").read_text())
           for t in range(iterations)]
    evals = [s["eval"] for s in its] + [its[-1]["eval_final"]]
    arms[arm] = dict(
        seconds=timings.get(arm),
        sft=_scores(evals[0]),
        iterations=[dict(iteration=t, **_scores(evals[t + 1]),
                         **_judging(workdir / arm / f"iter_{t}", answers),
                         pairs_kept=s["pairs"], seconds=_stage_seconds(workdir / arm, s))
                    for t, s in enumerate(its)])
  sft_seconds = sum(timings.get(stage) or 0 for stage in ("align", "sft"))
  return dict(sft=dict(seconds=sft_seconds, **arms["isr_dpo"]["sft"]),
              arms=arms)


def _scores(eval_rows: list[dict]) -> dict:
  """Held-out exact-match accuracy and mean greedy answer length (tokens)."""
  row = eval_rows[0]
  return dict(accuracy=row["accuracy"], answer_length=row["tokens"]["mean"])


def _judging(it_dir: pathlib.Path, answers: dict[str, str]) -> dict:
  """Sampled answers' accuracy and the judge's agreement with the ground truth."""
  responses = {r["id"]: r for r in records.load_jsonl(it_dir / "responses.jsonl")}
  correct = {i: [synthetic.answer_is_correct(y, answers[i]) for y in r["responses"]]
             for i, r in responses.items()}
  decided = [correct[j["id"]][j["winner"]]
             for j in records.load_jsonl(it_dir / "judgments.jsonl")
             if j["winner"] is not None and len(set(correct[j["id"]])) == 2]
  return dict(response_accuracy=float(np.mean([c for cs in correct.values() for c in cs])),
              judge_agreement=float(np.mean(decided)) if decided else None,
              pairs_one_correct=len(decided))


def _stage_seconds(arm_dir: pathlib.Path, summary: dict) -> dict:
  """Seconds of the sampling and judging stages and of the DPO steps."""
  seconds = {s["stage"]: s["seconds"] for s in summary["stages"]}
  metrics = arm_dir / f"iter_{summary['iteration']}" / "train" / "metrics.jsonl"
  rows = metrics_lib.read_metrics(metrics) if metrics.exists() else []
  seconds["dpo"] = sum(r["tokens"] / r["tokens_per_second"] for r in rows)
  return seconds


# Report.


def table(summary: dict) -> str:
  """The short terminal table: held-out accuracy by iteration, per arm."""
  arms = summary["arms"]
  n = len(next(iter(arms.values()))["iterations"])
  lines = [f"{'arm':18s} {'SFT':>6s}" + "".join(f" {'it' + str(t + 1):>6s}" for t in range(n))
           + f" {'agree':>6s} {'pairs':>6s} {'len':>5s} {'min':>5s}"]
  for name, arm in arms.items():
    its = arm["iterations"]
    agree = [i["judge_agreement"] for i in its if i["judge_agreement"] is not None]
    lines.append(
        f"{name:18s} {arm['sft']['accuracy']:6.3f}"
        + "".join(f" {i['accuracy']:6.3f}" for i in its)
        + f" {np.mean(agree) if agree else float('nan'):6.3f}"
        + f" {sum(i['pairs_kept'] for i in its):6d}"
        + f" {its[-1]['answer_length']:5.1f}"
        + f" {(arm['seconds'] or 0) / 60:5.1f}")
  return "\n".join(lines)


def write_report(workdir: pathlib.Path, summary: dict) -> pathlib.Path:
  """report.md with the table and report.png: accuracy, agreement, length, yield."""
  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  for name, arm in summary["arms"].items():
    its = arm["iterations"]
    ts = [i["iteration"] + 1 for i in its]
    axes[0].plot([0] + ts, [arm["sft"]["accuracy"]] + [i["accuracy"] for i in its],
                 marker="o", label=name)
    axes[1].plot(ts, [np.nan if i["judge_agreement"] is None else i["judge_agreement"]
                      for i in its], marker="o", label=name)
    axes[2].plot([0] + ts, [arm["sft"]["answer_length"]] + [i["answer_length"] for i in its],
                 marker="o", label=name)
    axes[3].plot(ts, [i["pairs_kept"] for i in its], marker="o", label=name)
  titles = ("held-out accuracy of pi_t (t=0: SFT)", "judge agreement with the truth",
            "held-out answer length (tokens)", "pairs kept")
  for ax, title in zip(axes, titles):
    ax.set(title=title, xlabel="t")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "report.png", dpi=80)
  plt.close(fig)
  lines = ["# ISR-DPO demo on the synthetic video world", "", "![plots](report.png)", "",
           "```", table(summary), "```", "",
           "Accuracy: exact match of greedy answers on held-out videos. agree: judge "
           "agreement (kept pairs with exactly one correct answer whose chosen answer "
           "is the correct one), mean over iterations. pairs: kept over all "
           "iterations. len: mean answer tokens after the last iteration. min: wall "
           "minutes of the arm.", "", "## Per iteration", "",
           "| arm | t | accuracy after | answer len | sampled acc | judge agreement "
           "| one-correct pairs | pairs kept | seconds by stage |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, arm in summary["arms"].items():
    for i in arm["iterations"]:
      agree = "-" if i["judge_agreement"] is None else f"{i['judge_agreement']:.3f}"
      stages = ", ".join(f"{k} {v:.0f}" for k, v in i["seconds"].items())
      lines.append(f"| {name} | {i['iteration']} | {i['accuracy']:.3f} | "
                   f"{i['answer_length']:.1f} | {i['response_accuracy']:.3f} | {agree} | "
                   f"{i['pairs_one_correct']} | {i['pairs_kept']} | {stages} |")
  lines += ["", f"SFT: accuracy {summary['sft']['accuracy']:.3f}, "
            f"{(summary['sft']['seconds'] or 0):.0f}s. Each arm's own report: "
            + ", ".join(f"[{a}]({a}/report.md)" for a in summary["arms"]), ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path
