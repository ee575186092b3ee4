"""The built-in experiment: `isr-dpo demo` (what `make demo` runs).

ISR-DPO starts from an SFT model, as the paper starts from LLaVA-Hound-SFT.
The demo ships its own (config.demo.pi0) and spends its minutes on the loop.

`--stage=loop` (the default), in `<workdir>/`:
  world/                  the synthetic world's videos and jsonl files
  video_cache/            every video decoded once (prepare-videos)
  loop_prompts.jsonl      every question about the loop's clips
  isr_dpo/                ISR-DPO iterations (iterate.py), judge with context
  no_context/             the same, the judge denied the context
  no_retrospection/       the same, each context written from scratch
  ground_truth_judge/     the same pairs judged by the world's answers: the
                          positive control of the DPO and loop machinery
  summary.json, report.md held-out accuracy, its change against SFT with a
  report.png              paired 95% interval, judge agreement with its
                          interval, per arm and iteration (demo_report.py)

`--stage=sft` trains pi_0 (about 80 minutes on 2 cores), in `<workdir>/`:
  world/, init/           the world; a random model and its tokenizer
  align/                  SFT stage 1, captions only -> align/model
  sft/                    SFT stage 2, the mix -> sft/model = pi_0

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

Some judge examples that show the description show another clip's video:
only the description answers them, so that the judge would learn to read it
(with the true video it could look instead). Measured on the shipped pi_0,
it has not: on held-out clips its verdicts follow the responses' positions,
with or without a description (agreement 0.50; docs/2026-12-03-demo-pi0.md).

Reruns continue where a killed run stopped (every phase resumes).
"""
import json
import logging
import pathlib
import shutil
import time

import ml_collections
import tqdm

from isr_dpo_jax import bootstrap
from isr_dpo_jax import demo_report
from isr_dpo_jax import errors
from isr_dpo_jax import iterate
from isr_dpo_jax import prepare_videos
from isr_dpo_jax import settings
from isr_dpo_jax import sft
from isr_dpo_jax.data import records
from isr_dpo_jax.world import sft_data

# Arm name -> config overrides, all from pi_0: ISR-DPO, the paper's two
# ablations, and the positive control (the same pairs, DPO and evaluation;
# the world's answers as the judge, which reads no context, so none is
# written for it).
ARMS = {
    "isr_dpo": {},
    "no_context": {"self_judge.use_context": False},
    "no_retrospection": {"self_judge.retrospective": False},
    "ground_truth_judge": {"self_judge.mode": "ground_truth",
                           "self_judge.use_context": False},
}
# Without an earlier context to revisit, the first iteration of this arm is
# the same computation as ISR-DPO's: it is copied, not run again.
SAME_FIRST_ITERATION = {"no_retrospection": "isr_dpo"}


def main(config: ml_collections.ConfigDict, workdir: str, stage: str = "loop") -> None:
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  if stage == "sft":
    print(f"pi_0: {train_pi0(config, workdir)}")
    return
  summary = run(config, workdir)
  print(demo_report.table(summary))
  print(f"report: {pathlib.Path(workdir) / 'report.md'}")


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Every arm's iterations from pi_0; writes and returns the summary."""
  workdir = pathlib.Path(workdir)
  config = config.copy_and_resolve_references()
  config.model.checkpoint = config.model.checkpoint or config.demo.pi0
  if not (pathlib.Path(config.model.checkpoint) / "config.json").exists():
    raise errors.UserError(f"pi_0 {config.model.checkpoint!r} holds no model: "
                           "`isr-dpo demo --stage=sft` trains it")
  config.world.dir = str(workdir / "world")
  world = bootstrap.prepare(config, workdir)
  config.data.prompts = str(write_loop_prompts(world, config.demo.loop_clips,
                                                workdir / "loop_prompts.jsonl"))
  config.data.video_cache = str(workdir / "video_cache")
  prepare_videos.run(config, workdir)  # every video decoded once
  with _Phases(workdir, list(ARMS)) as phases:
    for arm in phases:
      _share_first_iteration(workdir, arm)
      iterate.run(arm_config(config, ARMS[arm]), workdir / arm)
  summary = demo_report.summarize(workdir, config, world, list(ARMS), phases.timings)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  demo_report.write(workdir, summary)
  return summary


def write_loop_prompts(world: bootstrap.Setup, num_clips: int,
                       path: pathlib.Path) -> pathlib.Path:
  """The loop's prompts: every question about the last `num_clips` training
  clips, which SFT stage 2 did not see. The same videos every iteration, so
  that each context revisits the last one (self-retrospection)."""
  clips = {c["video"] for c in sft_data.training_clips(world.ground_truth)[-num_clips:]}
  records.write_jsonl(path, [r for r in records.load_jsonl(world.prompts)
                             if r["video"] in clips])
  return path


def _share_first_iteration(workdir: pathlib.Path, arm: str) -> None:
  """What an earlier arm computed that `arm` would compute again, copied into
  its first iteration, which then resumes from it: pi_0's greedy answers and
  sampled pairs (the same policy, seed and prompts in every arm), or the
  whole iteration (SAME_FIRST_ITERATION)."""
  first = workdir / next(iter(ARMS)) / "iter_0"
  copy = workdir / arm / "iter_0"
  if arm in SAME_FIRST_ITERATION:
    if not copy.exists():
      partial = copy.with_name("iter_0.copying")
      shutil.rmtree(partial, ignore_errors=True)
      shutil.copytree(workdir / SAME_FIRST_ITERATION[arm] / "iter_0", partial)
      partial.rename(copy)
    return
  for done in [*first.glob("eval/*/predictions.jsonl"), first / "responses.jsonl"]:
    target = copy / done.relative_to(first)
    if done.exists() and not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(done, target)


def train_pi0(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """`--stage=sft`: the world, then SFT's two stages; returns pi_0's directory.

  The demo ships this model (config.demo.pi0); rerun it to reproduce it.
  """
  workdir = pathlib.Path(workdir)
  world = bootstrap.prepare(config, workdir)
  ground_truth = world.ground_truth
  with _Phases(workdir, ["align", "sft"]) as phases:
    for phase in phases:
      if phase == "align":
        captions = sft_data.write_captions(ground_truth, workdir / "align_data.jsonl")
        sft.run(sft_config(config, world, captions, world.init_checkpoint,
                           config.demo.align), workdir / "align")
      else:
        mix = sft_data.write_sft_mix(ground_truth, settings.prompts(config), config.demo,
                                     config.seed, workdir / "sft_data.jsonl")
        sft.run(sft_config(config, world, mix, workdir / "align" / "model"),
                workdir / "sft")
  return workdir / "sft" / "model"


class _Phases:
  """Named phases under a progress bar; each one's wall time goes to
  <workdir>/timings.json, and a phase found there is skipped (resume)."""

  def __init__(self, workdir: pathlib.Path, names: list[str]):
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / "timings.json"
    self.timings = json.loads(self.path.read_text()) if self.path.exists() else {}
    self.bar = tqdm.tqdm(names, desc="demo", unit="phase")

  def __iter__(self):
    for name in self.bar:
      self.bar.set_postfix_str(name)
      if name in self.timings:
        continue
      clock = time.perf_counter()
      yield name
      self.timings[name] = time.perf_counter() - clock
      self.path.write_text(json.dumps(self.timings, indent=1))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.bar.close()


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


def arm_config(config, overrides: dict):
  """An arm's loop: the demo's run config with the arm's `overrides`."""
  c = config.copy_and_resolve_references()
  c.update_from_flattened_dict(overrides)
  return c
