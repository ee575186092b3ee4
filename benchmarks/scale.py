"""Scale on one accelerator: Video-LLaVA at 7B shape, measured against `isr-dpo plan`.

A random model of the config's architecture (bf16 compute over float32
parameters, as models.load_pretrained gives the run its model) and random
8-frame videos:

- generate: the context stage's programs (one sample a prompt) at batch
  64, prompts of the video and 128 tokens of text, 256 new tokens each (no
  stop token, so every row runs to the end); tokens/s, and decode's HBM
  bytes per step (XLA's cost analysis of the step) over its measured time as
  a fraction of the chip's bandwidth;
- dpo lora / dpo full: `Trainer.dpo_update` at the config's batch and
  accumulation, pairs of that prompt and 256-token responses; pairs/s and
  MFU (model FLOPs: 2 x LLM weights per token forward, twice that backward
  for the weights' gradients in full fine-tuning, once for LoRA's input
  gradients; attention and the frozen tower left out, so it is a floor).

Each part runs in its own process, so its device memory peak
(memory_stats' peak_bytes_in_use) is its programs' own; beside it, the peak
`isr-dpo plan` predicts for the same programs compiled for the same devices
(the largest of its programs). A part the plan finds too large is skipped.

  python benchmarks/scale.py                  # an accelerator: 7B, one chip
  python benchmarks/scale.py --small          # automatic on a CPU backend

--small runs the smoke config's tiny model at batch 64 and 8 new tokens, to
show the script works where no accelerator is lent (no chip to compare to).
"""
import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isr_dpo_jax import cli
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import plan
from isr_dpo_jax import sampling
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.data import batching
from isr_dpo_jax.data import video as video_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
PARTS = {"generate": ["contexts slots", "contexts prefill", "contexts decode"],
         "dpo lora": ["train video features", "dpo update"],
         "dpo full": ["train video features", "dpo update"]}
TEXT_TOKENS = 128  # a prompt's text beside its video


def bench_config(part: str, small: bool):
  """The run's config at the benchmark's shapes: one chip, batch 64."""
  name = "smoke.py" if small else "video_llava_7b_lora.py"
  config = cli.load_config(str(CONFIGS / name))
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sampling.batch_size = 64
  config.sampling.context.max_new_tokens = config.sampling.answer.max_new_tokens = (
      8 if small else 256)
  if small:
    config.train.lora.update(rank=4, alpha=8.0)
  if part == "dpo full":
    config.train.lora.rank = 0
  video_tokens = plan.abstract_model(config, plan.model_config(config)[0]).video.num_tokens
  config.data.max_length = video_tokens + TEXT_TOKENS + 8
  return config


def predicted(config, part: str, where: plan.Target) -> dict[str, plan.Row]:
  """The plan's rows for the part's programs on `where` (compiled here)."""
  mesh = plan.make_mesh(config, where)
  model = plan.abstract_model(config, plan.model_config(config)[0])
  shapes = plan.run_shapes(config, model.video.num_tokens)
  programs = (plan.training_programs(config, model, mesh, shapes, 1)
              if part.startswith("dpo") else
              plan.sampling_programs(config, model, mesh, shapes))
  wanted = [p for p in programs if p.name in PARTS[part]]
  return {r.program.name: r for r in plan.analyse(wanted, where, mesh, None,
                                                  log=lambda _: None)}


def random_model(config, mesh) -> models.VideoLanguageModel:
  family = models.registry.get(config.model.family)
  model = family.model(plan.model_config(config)[0], rngs=nnx.Rngs(0),
                       dtype=jnp.dtype(config.model.dtype),
                       param_dtype=jnp.float32)
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, parallel.state_shardings(state, mesh)))
  return model


def prompts(config, video: models.VideoInput, batch: int, rng):
  """Prompts at the plan's longest prompt (video inside) and uint8 frames."""
  length = plan.run_shapes(config, video.num_tokens).prompt
  ids = rng.integers(3, video.token_id - 1, (batch, length)).astype(np.int32)
  ids[:, 1:1 + video.num_tokens] = video.token_id
  frames = rng.integers(0, 256, (batch, *video.frames_shape), dtype=np.uint8)
  return ids, np.ones_like(ids, bool), frames


def timed(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls, after one warm-up call."""
  jax.block_until_ready(fn())
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure_generate(config, mesh, rows, chip, repeats) -> dict:
  model = random_model(config, mesh)
  sampler = sampling.Sampler(model, mesh)
  batch = config.sampling.batch_size
  ids, mask, frames = prompts(config, model.video, batch, np.random.default_rng(0))
  videos = np.asarray(video_lib.normalize(frames))
  params = dataclasses.replace(settings.sampling_params(config.sampling.context),
                               banned_ids=(model.video.token_id,))
  uids = np.arange(batch, dtype=np.int32)
  steps = params.max_new_tokens
  total = timed(lambda: sampler(ids, mask, videos, uids, params).lengths, repeats)
  prefill = timed(lambda: sampler.next_token_logprobs(ids, mask, videos), repeats)
  decode_s = max(total - prefill, 1e-9) / steps
  out = {"seconds": total, "tokens/s": batch * steps / total,
         "decode ms/token": 1e3 * decode_s}
  if chip is not None:
    out["decode HBM fraction"] = (rows["contexts decode"].analysis.bytes_accessed
                                  / decode_s / chip.hbm_bandwidth)
  return out


def llm_weights(model) -> int:
  """Matmul weights of the LLM: every 2-D kernel outside the video tower."""
  leaves = jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
  return sum(x.size for path, x in leaves if len(x.shape) == 2
             and "kernel" in jax.tree_util.keystr(path)
             and "tower" not in jax.tree_util.keystr(path))


def measure_dpo(config, mesh, rows, chip, repeats) -> dict:
  model = random_model(config, mesh)
  weights, video = llm_weights(model), model.video
  trainer = train.Trainer(model, settings.dpo_train_config(config), mesh,
                          total_steps=100)
  state = trainer.init_state(model)
  del model
  batch = config.train.batch_size
  rng = np.random.default_rng(0)
  ids, mask, frames = prompts(config, video, batch, rng)
  response = plan.run_shapes(config, video.num_tokens).dpo_response
  reply = lambda: (rng.integers(3, 1000, (batch, response)).astype(np.int32),
                   np.ones((batch, response), bool))
  pairs = batching.PreferenceBatch(ids, mask, *reply(), *reply())
  reference = np.zeros(batch, np.float32)

  def step():
    nonlocal state
    state, metrics = trainer.dpo_update(state, pairs, frames, reference, reference)
    return metrics["loss"]

  seconds = timed(step, repeats)
  tokens = batch * (ids.shape[1] + 2 * response)
  flops = (4 if trainer.base is not None else 6) * weights * tokens
  out = {"seconds": seconds, "pairs/s": batch / seconds,
         "model TFLOP": flops / 1e12}
  if chip is not None:
    out["MFU"] = flops / seconds / chip.peak_flops
  return out


def run_part(part: str, small: bool, repeats: int) -> dict:
  """One part in this process: the plan's prediction, then the measurement."""
  config = bench_config(part, small)
  where = plan.target(None)
  rows = predicted(config, part, where)
  fails = [r for r in rows.values() if r.analysis is None]
  out = {"part": part, "device": where.devices[0].device_kind,
         "plan peak GiB": None if fails else
         max(r.analysis.peak for r in rows.values()) / plan.GiB}
  if where.chip is not None and (fails or out["plan peak GiB"] * plan.GiB
                                 > where.chip.hbm_bytes):
    return out | {"skipped": "the plan says it does not fit"}
  mesh = plan.make_mesh(config, where)
  measure = measure_generate if part == "generate" else measure_dpo
  out |= measure(config, mesh, rows, where.chip, repeats)
  stats = where.devices[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["measured peak GiB"] = stats["peak_bytes_in_use"] / plan.GiB
    out["measured / plan"] = out["measured peak GiB"] / out["plan peak GiB"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="the smoke config's tiny model (default on CPU)")
  parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  small = args.small or jax.default_backend() == "cpu"
  if args.part:
    print(json.dumps(run_part(args.part, small, args.repeats)))
    return
  for part in PARTS:
    command = [sys.executable, __file__, f"--part={part}",
               f"--repeats={args.repeats}"] + ["--small"] * small
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      print(f"{part}: failed\n{result.stderr[-2000:]}")
      continue
    fields = json.loads(result.stdout.strip().splitlines()[-1])
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in fields.items()))


if __name__ == "__main__":
  main()
