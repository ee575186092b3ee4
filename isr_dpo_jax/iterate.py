"""The ISR-DPO loop: `isr-dpo iterate --config=configs/<name>.py --workdir=<dir>`.

Iteration t, in `<workdir>/iter_<t>/` (docs/method.md §1):
  1. responses.jsonl, contexts.jsonl   two answers per prompt; c_t per video
  2. judgments.jsonl                   pi_t's preference between its answers
  3. pairs.jsonl                       DPO records with reference log-probs
  4. checkpoints/, policy/             DPO from pi_t (Orbax); pi_{t+1}'s params
  +  eval/, errors.jsonl, train/metrics.jsonl, summary.json
`<workdir>/report.md` and its plots are rewritten after every iteration.

Everything is written as it goes, so running the same command again after a
kill continues where it stopped and ends with the same pairs and parameters.

On several processes (launch/) every process runs this same loop: the stages
split their batches over the processes and gather the results, process 0
writes the files, and the others wait at a barrier before reading them.
"""
import json
import logging
import math
import pathlib
import sys

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from isr_dpo_jax import bootstrap
from isr_dpo_jax import checkpoint
from isr_dpo_jax import distributed
from isr_dpo_jax import evaluate
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import report
from isr_dpo_jax import settings
from isr_dpo_jax import stages
from isr_dpo_jax import train
from isr_dpo_jax.data import records


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  if run(config, workdir) and distributed.is_main_process():
    print(f"report: {pathlib.Path(workdir) / 'report.md'}")


def run(config: ml_collections.ConfigDict, workdir) -> list[dict]:
  """Runs (or resumes) every iteration; returns their summaries."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(dict(config.mesh))
  # Process 0 writes the synthetic world and pi_0, the others then find them.
  distributed.write_on_main(workdir, lambda: bootstrap.prepare(config, workdir))
  setup = bootstrap.prepare(config, workdir)
  items, skipped = read_prompts(setup.prompts, setup.video_root,
                                config.data.max_error_rate, workdir)
  summaries = []
  with metrics_lib.MetricsWriter(workdir) as writer:  # one step per iteration
    for t in range(config.iterations):
      summaries.append(iteration(t, config, workdir, mesh, setup, items, skipped))
      writer.write(t, report.scalars(summaries[-1]))
      _write_report(workdir, summaries)
  final = workdir / f"iter_{config.iterations - 1}" / "eval_final"
  if config.eval.enabled and config.iterations and "eval_final" not in summaries[-1]:
    policy = load_policy(config, workdir, mesh, setup, config.iterations)
    summaries[-1]["eval_final"] = evaluate.evaluate_policy(policy, config, setup.test_sets, final)
    _write_summary(workdir / f"iter_{config.iterations - 1}", summaries[-1])
    _write_report(workdir, summaries)
  return summaries


def read_prompts(path, video_root, max_error_rate, workdir: pathlib.Path
                 ) -> tuple[list[dict], dict[str, int]]:
  """(video, question) items of a QA jsonl, and bad lines counted by reason.

  Bad lines (malformed, missing fields, missing videos, an empty question, an
  id already read on an earlier line) are named in
  `<workdir>/prompt_errors.jsonl`; past `max_error_rate` the run stops.
  """
  report_ = records.ReadReport()
  items, line_of_id = [], {}
  for line, record in records.iter_jsonl(path, "qa", report_, video_root):
    try:
      items.append(_prompt_item(record, path, line, line_of_id))
    except records.BadRecord as e:
      report_.skip(path, line, e)
      continue
    report_.keep(record)
  errors_path = workdir / "prompt_errors.jsonl"
  distributed.write_on_main(errors_path,
                            lambda: records.write_errors(errors_path, report_))
  if report_.errors:
    logging.warning("prompts: %s", report_.summary())
  report_.check(max_error_rate)
  return items, dict(report_.counts)


def _prompt_item(record: dict, path, line: int, line_of_id: dict[str, int]) -> dict:
  """A QA record's (video, question) item; notes its id's line in `line_of_id`.

  Raises BadRecord for an id that `line_of_id` holds already (every stage
  keys its records by id) and for a question with no text besides "<video>".
  """
  if record["id"] in line_of_id:
    raise records.BadRecord("duplicate_id", f"id {record['id']!r} is also on line "
                            f"{line_of_id[record['id']]}")
  question = records.conversation_turns(record["conversations"])[0][0]
  question = question.replace("<video>", "").strip()
  if not question:
    raise records.BadRecord("empty_question", "the question has no text besides <video>")
  line_of_id[record["id"]] = line
  return dict(id=record["id"], video=record["video"], question=question,
              file=str(path), line=line)


def iteration_seed(seed: int, t: int) -> int:
  """The seed of iteration t's sampling, judging and training in a run of
  `seed`: one per (seed, t) for t < 1000, so that no two iterations, of this
  run or another, draw the same keys; a resumed iteration draws its own again."""
  return seed * 1000 + t


def select(items: list[dict], config, t: int) -> list[dict]:
  """This iteration's prompts: a fixed subset, or a fresh one per iteration."""
  n = config.data.prompts_per_iteration or len(items)
  seed = config.seed + (t if config.data.fresh_prompts else 0)
  order = np.random.default_rng(seed).permutation(len(items))[:n]
  return [items[i] for i in sorted(order)]


def load_policy(config, workdir, mesh, setup: bootstrap.Setup, t: int) -> policy_lib.Policy:
  """pi_t: pi_0 from its checkpoint, later ones with iteration t-1's params."""
  params_dir = workdir / f"iter_{t - 1}" / "policy" if t > 0 else None
  return policy_lib.Policy.from_config(config, setup, mesh, params_dir)


def iteration(t: int, config, workdir: pathlib.Path, mesh, setup: bootstrap.Setup,
              items: list[dict], prompts_skipped: dict[str, int]) -> dict:
  """One ISR-DPO iteration; a finished one is read back from its summary."""
  it_dir = workdir / f"iter_{t}"
  summary_path = it_dir / "summary.json"
  header = f"iteration {t + 1}/{config.iterations}: {it_dir}"
  if summary_path.exists():
    _say(f"{header}, resumed (done)")
    return json.loads(summary_path.read_text())
  _say(header)
  it_dir.mkdir(parents=True, exist_ok=True)
  seed = iteration_seed(config.seed, t)
  policy = load_policy(config, workdir, mesh, setup, t)
  summary = dict(iteration=t, prompts_skipped=prompts_skipped)
  if config.eval.enabled:
    summary["eval"] = evaluate.evaluate_policy(policy, config, setup.test_sets,
                                                it_dir / "eval")

  errors = stages.ErrorLog(it_dir / "errors.jsonl")
  prompts = select(items, config, t)
  answered, s1 = stages.responses(prompts, policy, config, seed,
                                  it_dir / "responses.jsonl", errors)
  videos = sorted({x["video"]: x for x in prompts}.values(), key=lambda x: x["video"])
  # A judge denied the context (an ablation, the ground truth) gets none written.
  videos = [dict(x, id=x["video"]) for x in videos] if config.self_judge.use_context else []
  previous = carried_contexts(workdir, t)
  written, s2 = stages.contexts(videos, previous, policy, config, seed,
                                it_dir / "contexts.jsonl", errors)
  context_of = {c["video"]: c["context"] for c in written}
  where = {x["id"]: dict(file=x["file"], line=x["line"]) for x in prompts}  # for errors
  judged, s3 = stages.judgments([dict(a, **where[a["id"]]) for a in answered], context_of,
                                policy, config, seed, it_dir / "judgments.jsonl", errors,
                                ground_truth=setup.ground_truth)
  pairs = stages.preference_records(answered, judged)

  num_steps = math.ceil(config.train.epochs * len(pairs) / config.train.batch_size)
  trainer = train.Trainer(policy.model, settings.dpo_train_config(config), mesh,
                          total_steps=max(num_steps, 1))
  reference = (policy.model if config.dpo.reference == "previous" else
               models.load_pretrained(setup.init_checkpoint, family=config.model.family,
                                      mesh=mesh, dtype=jnp.dtype(config.model.dtype),
                                      param_dtype=jnp.float32))
  pairs = stages.reference_logps(pairs, it_dir / "pairs.jsonl", policy, trainer,
                                 nnx.to_pure_dict(nnx.state(reference)),
                                 config.train.batch_size, errors)
  params = nnx.to_pure_dict(nnx.state(policy.model))
  if pairs:
    state = stages.dpo(pairs, it_dir / "pairs.jsonl", policy, trainer, num_steps,
                       config, seed, it_dir)
    params = trainer.model_params(state)  # LoRA: merged, a plain model
  else:
    logging.warning("iteration %d: no preference pairs; pi_%d = pi_%d", t, t + 1, t)
  checkpoint.save_params(params, it_dir / "policy")

  summary["stages"] = [s.as_dict() for s in (s1, s2, s3)]
  summary["pairs"] = len(pairs)
  summary["pairs_dropped"] = dict(errors.count("pairs"))
  summary["train"] = report.train_summary(it_dir / "train" / "metrics.jsonl")
  errors.close()
  _say("\n".join(f"  {s.line()}" for s in (s1, s2, s3)))
  _write_summary(it_dir, summary)
  return summary


def _say(text: str) -> None:
  """Progress for the person watching: process 0's stderr, between the bars."""
  if distributed.is_main_process():
    tqdm.tqdm.write(text, file=sys.stderr)


def _write_report(workdir: pathlib.Path, summaries: list[dict]) -> None:
  distributed.write_on_main(workdir / "report.md",
                            lambda: report.write(workdir, summaries))


def _write_summary(it_dir: pathlib.Path, summary: dict) -> None:
  """summary.json marks the iteration finished (written last, atomically)."""
  path = it_dir / "summary.json"

  def write():
    tmp = it_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)

  distributed.write_on_main(path, write)


def carried_contexts(workdir: pathlib.Path, t: int) -> dict[str, str]:
  """c_{t-1} per video: the latest context written for it before iteration t."""
  contexts = {}
  for s in range(t):
    path = workdir / f"iter_{s}" / "contexts.jsonl"
    if path.exists():
      contexts |= {r["video"]: r["context"] for r in records.load_jsonl(path)}
  return contexts
