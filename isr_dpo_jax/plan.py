"""`isr-dpo plan`: a run's compiled programs, sized for a TPU slice from any host.

  isr-dpo plan --config=configs/video_llava_7b.py --topology=v5p:2x2x2

Every jitted program that `isr-dpo iterate` runs (and `isr-dpo sft`'s update)
is lowered from abstract shapes, so no parameter is ever materialised, and
compiled ahead of time for the target: the chips of a TPU topology, which
libtpu describes on a host without TPUs (as MaxText's train_compile.py does),
or else the local devices. The programs are the project's own jitted
functions (the Trainer's and the Sampler's) at the config's shapes and
shardings, so the compiler's memory analysis is the run's: per chip, the
arguments, the temporaries and their peak against the chip's HBM. Its cost
analysis (FLOPs, HBM bytes) gives each program a roofline time, and those give
an estimate of one ISR-DPO iteration.

Shapes are the largest a run meets, so that "fits" holds for every batch:
prompts at the longest bucket that data.max_length admits, responses at
max_new_tokens. XLA counts a loop's body once; the plan adds the matrix
products of every scan's other iterations (micro-batches, decoder layers,
attention blocks) from the program's jaxpr, so an update's cost is the whole
step's. A decode program's loop has no trip count: its cost is one token, and
the estimate multiplies it by max_new_tokens.

JAX cannot load a compile-only executable back from its persistent cache, so
the plan keeps each program's analysis itself, keyed by a hash of the lowered
program and of the target: planning the same config again only lowers.
"""
from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

import jax
from jax.experimental import topologies
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

from isr_dpo_jax import errors
from isr_dpo_jax import judge
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import sampling
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.data import batching
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.models import checkpoints
from isr_dpo_jax.world import build

GiB = 2**30
FITS = 0.9  # the share of HBM a program may plan to use


class PlanError(errors.UserError):
  """A plan that cannot be made as asked: no such topology, a mesh or batch
  that does not fit it, no libtpu."""


# ---------------------------------------------------------------------------
# Chips
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  """What bounds a program on one chip: bf16 FLOP/s, HBM bytes/s, HBM bytes."""
  name: str
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: float


# Peak FLOP/s and HBM bandwidth from each maker's specification (a "GB" there
# taken as 1e9 bytes). A TPU's HBM is what libtpu 0.0.42 lets a program use
# (its out-of-memory message): a little less than the specification's.
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOPs (bf16); HBM2 32 GiB, 1200 GBps.
    "v4": Chip("TPU v4", 275e12, 1200e9, 30.75 * GiB),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPs (bf16); HBM2e 95 GB, 2765 GBps.
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95.74 * GiB),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs (bf16); HBM2 16 GB, 819 GBps.
    "v5e": Chip("TPU v5e", 197e12, 819e9, 15.75 * GiB),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOPs (bf16); HBM 32 GB, 1640 GBps.
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 31.25 * GiB),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM: 989 TFLOPS dense bf16
    # (1,979 is with sparsity); HBM3 80 GB, 3.35 TB/s.
    "h100": Chip("NVIDIA H100", 989e12, 3.35e12, 80e9),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: 989 TFLOPS dense bf16;
    # HBM3e 141 GB, 4.8 TB/s.
    "h200": Chip("NVIDIA H200", 989e12, 4.8e12, 141e9),
}
# jax.Device.device_kind -> chip.
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5": "v5p", "TPU v5p": "v5p",
                 "TPU v5 lite": "v5e", "TPU v6 lite": "v6e",
                 "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200"}
# Topology chip names (libtpu's) and their options: each chip of a v4 holds
# two TensorCores that compile as one device only in megacore mode (without
# it a v4:2x2x2 has 16 devices, which a mesh over chips cannot use).
_TOPOLOGY_OPTIONS = {"v4": {"chip_config_name": "megacore"}, "v5p": {},
                     "v5e": {}, "v6e": {}}
# Chips per host (libtpu's default bounds): a smaller slice, such as one chip
# (v5p:1x1x1), is described with its own shape as the host's (libtpu takes
# three bounds).
_HOST_BOUNDS = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2), "v6e": (2, 2)}
# What XLA's GPU compiler reads about a GPU it cannot see
# (stream_executor.GpuTargetConfigProto in openxla/xla): a Hopper SXM's
# figures from NVIDIA's H100 and H200 datasheets and the CUDA C++ Programming
# Guide's table for compute capability 9.0; its memory and bandwidth are the
# chip table's. The device description is the GPU's device_kind.
_HOPPER = {
    "core_count": 132, "fpus_per_core": 128, "clock_rate_ghz": 1.98,
    "threads_per_warp": 32, "threads_per_block_limit": 1024,
    "threads_per_core_limit": 2048, "registers_per_block_limit": 65536,
    "registers_per_core_limit": 65536, "shared_memory_per_block": 48 * 1024,
    "shared_memory_per_block_optin": 227 * 1024,
    "shared_memory_per_core": 228 * 1024, "l2_cache_size": 50 * 2**20,
    "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535, "cuda_compute_capability": "{ major: 9 }"}
_GPU_TARGETS = {"h100": ("NVIDIA H100 80GB HBM3", _HOPPER),
                "h200": ("NVIDIA H200", _HOPPER)}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the programs compile: devices, their chip (None: unknown), a name;
  compile-only devices (a topology's) can run nothing; XLA options for them."""
  devices: Sequence[jax.Device]
  chip: Chip | None
  name: str
  compile_only: bool = False
  compiler_options: dict = dataclasses.field(default_factory=dict)


def target(topology: str | None) -> Target:
  """The chips of a TPU topology ("v5p:2x2x2"), of GPU hosts ("h100:8" or
  "h100:2x8", hosts x GPUs each), or this host's devices."""
  if topology is None:
    devices = jax.devices()
    kind = devices[0].device_kind
    chip = CHIPS.get(_DEVICE_KINDS.get(kind))
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if chip is not None and limit:  # what the allocator lets a program use
      chip = dataclasses.replace(chip, hbm_bytes=limit)
    return Target(devices, chip, f"{len(devices)} local {kind} devices")
  chip, _, shape = topology.partition(":")
  if chip in _GPU_TARGETS and re.fullmatch(r"\d+(x\d+)?", shape):
    return _gpu_target(chip, shape)
  if chip not in _TOPOLOGY_OPTIONS or not re.fullmatch(r"\d+(x\d+)+", shape):
    raise PlanError(
        f"unknown topology {topology!r}: give <chip>:<shape>, chip one of "
        f"{', '.join(_TOPOLOGY_OPTIONS)} (e.g. v5p:2x2x2, or v4:2x2x4 for a "
        f"v4-32 of 16 chips), or <gpu>:[<hosts>x]<gpus>, gpu one of "
        f"{', '.join(_GPU_TARGETS)} (e.g. h100:8)")
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError("planning for a TPU topology needs libtpu: "
                    "pip install 'isr_dpo_jax[tpu]'")
  # A compile-only client uses no TPU, so it need not take libtpu's
  # one-process lock (/tmp/libtpu_lockfile): plans run beside each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  options = dict(_TOPOLOGY_OPTIONS[chip])
  dims, host = tuple(map(int, shape.split("x"))), _HOST_BOUNDS[chip]
  if len(dims) == len(host) and any(d < h for d, h in zip(dims, host)):
    bounds = tuple(map(min, dims, host))
    options["chips_per_host_bounds"] = bounds + (1,) * (3 - len(bounds))
  try:
    devices = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", **options).devices
  except jax.errors.JaxRuntimeError as e:
    reason = str(e).strip().splitlines()[0]
    raise PlanError(f"unknown topology {topology!r}: {reason}") from None
  return Target(devices, CHIPS[chip], f"{topology} ({len(devices)} chips)",
                compile_only=True)


def gpu_target_config(chip: str) -> str:
  """The GpuTargetConfigProto text that XLA compiles for `chip` from."""
  kind, figures = _GPU_TARGETS[chip]
  figures = {**figures, "memory_bandwidth": int(CHIPS[chip].hbm_bandwidth),
             "device_memory_size": int(CHIPS[chip].hbm_bytes)}
  fields = " ".join(f"{k}: {v}" for k, v in figures.items())
  return (f"gpu_device_info {{ {fields} }} "
          f'platform_name: "CUDA" dnn_version_info {{ major: 9 }} '
          f'device_description_str: "{kind}"')


def _gpu_target(chip: str, shape: str) -> Target:
  """Compile-only GPUs from a target description (JAX's CUDA plugin, which
  needs no GPU and no CUDA libraries to compile; it cannot run them)."""
  hosts, _, per_host = shape.rpartition("x")
  topology = f"1x{hosts or 1}x{per_host}"
  needs = ("planning for GPUs needs JAX's CUDA plugin (pip install "
           "'isr_dpo_jax[gpu-plan]') and, on a host without a GPU, "
           "JAX_PLATFORMS=cpu")
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise PlanError(needs)
  if not os.environ.get("JAX_PLATFORMS"):
    # Compiling for GPUs uses none of this host's: the CUDA plugin is not
    # started, so it cannot fail for want of a GPU (if JAX has not started
    # its backends yet; otherwise JAX_PLATFORMS=cpu is needed).
    jax.config.update("jax_platforms", "cpu")
  try:
    devices = topologies.get_topology_desc(
        platform="cuda", topology=topology,
        target_config=gpu_target_config(chip)).devices
  except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
    reason = str(e).strip().splitlines()[0]
    raise PlanError(f"{needs} ({reason})") from None
  # Without a GPU, XLA cannot autotune Triton's tiles for a matrix product
  # and fails on some shapes ("Couldn't find output tile sizes"): the plan
  # compiles the products as cuBLAS calls.
  return Target(devices, CHIPS[chip], f"{chip}:{shape} ({len(devices)} GPUs)",
                compile_only=True,
                compiler_options={"xla_gpu_enable_triton_gemm": False})


def make_mesh(config, where: Target) -> jax.sharding.Mesh:
  try:
    return parallel.make_mesh(dict(config.mesh), where.devices)
  except (ValueError, NotImplementedError) as e:
    raise PlanError(f"config.mesh {dict(config.mesh)} does not fit "
                    f"{where.name}: {e}") from None


# ---------------------------------------------------------------------------
# The run's model and shapes
# ---------------------------------------------------------------------------


def model_config(config) -> tuple[Any, str]:
  """The run's architecture (its family's config) and where it comes from.

  The checkpoint's config.json when it is on this host; the synthetic world's
  tiny model; else the family's default config (video_llava's is
  Video-LLaVA-7B, the architecture of every checkpoint the paper's configs
  name).
  """
  family, checkpoint = config.model.family, config.model.checkpoint
  if checkpoint and (pathlib.Path(checkpoint) / "config.json").is_file():
    return (checkpoints.read_config(checkpoint, family)[0],
            f"{checkpoint}/config.json")
  if config.get("world") is not None:
    vocab = config.world.vocab_size
    return (build.tiny_model_config(config.world, vocab, vocab - 1, family),
            "the synthetic world's tiny model")
  return models.registry.get(family).config(), (
      f"{family}'s default architecture ({checkpoint or 'no checkpoint'} is "
      "not on this host)")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The longest rows of a run, in tokens (video tokens included)."""
  prompt: int  # a generation prompt
  suffix: int  # a judge order's tokens after the start it shares
  dpo_prompt: int
  dpo_response: int
  sft_prompt: int
  sft_target: int


def _longest_row(max_length: int, video_tokens: int, buckets, responses: int,
                 response_cap: int) -> tuple[int, int]:
  """(prompt, response) lengths, bucketed, of the longest rows the loader
  makes: data.tokenize admits a prompt of up to max_length - 8 tokens and cuts
  a response to the rest of max_length; a row holds `responses` of them."""
  longest, best = 0, None
  prompt_limit = max_length - tokenize.TextEncoder.min_response_tokens
  shortest_text = 1
  for bucket in sorted(buckets):  # the shortest prompt text of each bucket
    if video_tokens + shortest_text > prompt_limit:
      break
    response = min(max_length - video_tokens - shortest_text, response_cap,
                   max(buckets))
    row = (video_tokens + bucket, batching.bucket_length(response, buckets))
    if row[0] + responses * row[1] > longest:
      longest, best = row[0] + responses * row[1], row
    shortest_text = bucket + 1
  if best is None:
    raise PlanError(f"data.max_length={max_length} leaves no room for a "
                    f"prompt: a video alone is {video_tokens} tokens")
  return best


def _judge_suffix(config) -> int:
  """The most tokens a judge order has after the start it shares with the
  other order (policy.Policy._prompt): from its response A to the end of the
  prompt. Each response is an answer sample, at most answer.max_new_tokens
  tokens and one more when its text is tokenised again (as for DPO); the
  template's text after response A is counted in characters, as no tokenizer
  makes a token of less than one, and one more for a token that spans its
  start."""
  response_a, response_b = "\x00a", "\x00b"
  question = judge.judge_question(settings.prompts(config), "?", response_a,
                                  response_b, "")
  text = templates.resolve(config.data.template).prompt(question)
  tail = text[text.index(response_a) + len(response_a):].replace(response_b, "")
  return 2 * (config.sampling.answer.max_new_tokens + 1) + len(tail) + 1


def run_shapes(config, video_tokens: int) -> Shapes:
  """Shapes for `config`'s data.max_length and buckets.

  A DPO response is a sample of at most answer.max_new_tokens tokens; its
  text, tokenised again with the template's stop text, can be one longer. A
  judge order's own part is its two responses and the judge question's text
  after them (`_judge_suffix`), and at most a whole prompt's text.
  """
  args = (config.data.max_length, video_tokens, config.sampling.buckets)
  dpo = _longest_row(*args, 2, config.sampling.answer.max_new_tokens + 1)
  sft_ = _longest_row(*args, 1, config.data.max_length)
  prompt = _longest_row(*args, 0, 1)[0]
  suffix = batching.bucket_length(
      min(_judge_suffix(config), prompt - video_tokens), config.sampling.buckets)
  return Shapes(prompt=prompt, suffix=suffix, dpo_prompt=dpo[0],
                dpo_response=dpo[1], sft_prompt=sft_[0], sft_target=sft_[1])


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function traced at a run's shapes.

  `trace` gets the abstract outputs (with shardings) of the programs it
  `needs`, by name: a decode step takes what its prefill returned.
  """
  name: str
  shape: str  # what it runs on, for the table
  trace: Callable[[dict[str, Any]], jax.stages.Traced]
  needs: tuple[str, ...] = ()


def _placed(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves with the given shardings."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def abstract_model(config, model_cfg) -> models.VideoLanguageModel:
  """The run's model, as shapes only: bf16 (or the config's) compute over
  float32 parameters, as models.load_pretrained gives it."""
  family = models.registry.get(config.model.family)
  return nnx.eval_shape(lambda: family.model(
      model_cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(config.model.dtype),
      param_dtype=jnp.float32))


def _with_stops(params: sampling.SamplingParams, video: models.VideoInput
                ) -> sampling.SamplingParams:
  """`params` with Policy's stops: one stop id (its value does not change the
  program) and the video placeholder banned."""
  return dataclasses.replace(params, stop_ids=(2,), banned_ids=(video.token_id,))


def sampling_programs(config, model: models.VideoLanguageModel, mesh,
                      shapes: Shapes) -> list[Program]:
  """The Sampler's programs of each stage at the sampling batch and the
  longest prompt: answers (2 samples a prompt), contexts and the evaluation's
  greedy answers with continuous batching (their slots, a whole batch
  inserted, a decode step), and the judge (a pair's two orders continue their
  shared start: one scoring pass, or generated verdicts in static batches)."""
  sampler = sampling.Sampler(model, mesh)
  state = _placed(sampler.state, parallel.state_shardings(sampler.state, mesh))
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  replicated = NamedSharding(mesh, P())
  batch, length = config.sampling.batch_size, shapes.prompt
  tokens = lambda b, n: (jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=rows),
                         jax.ShapeDtypeStruct((b, n), bool, sharding=rows))
  prompts = (*tokens(batch, length), jax.ShapeDtypeStruct(
      (batch, *model.video.frames_shape), jnp.float32, sharding=rows))
  orders = tokens(2 * batch, shapes.suffix)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  uids = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
  slot_of = uids  # each prompt's slot, as Slots.insert gives it
  drain = jax.ShapeDtypeStruct((), bool, sharding=replicated)

  def streamed(stage, params, num_samples):
    """generate._continuous's programs: sampling.Slots' empty slots, an insert
    of a whole batch (the stage's prefill) and a step of its decode loop."""
    params = _with_stops(params, model.video)
    shape = (f"{batch} slots x {num_samples}, {length} + "
             f"{params.max_new_tokens} tokens")
    slots = Program(f"{stage} slots", shape, lambda _: sampler._empty.trace(
        state, *tokens(batch, length), None, num_samples=num_samples,
        max_new_tokens=params.max_new_tokens))
    insert = Program(f"{stage} prefill", f"{batch} prompts into {shape}",
                     lambda done: sampler._insert.trace(
                         state, done[slots.name], *prompts, slot_of, scalar,
                         uids, params=params, num_samples=num_samples),
                     needs=(slots.name,))
    decode = Program(f"{stage} decode", shape + ", per token",
                     lambda done: sampler._resume.trace(
                         state, done[insert.name], drain, scalar, params=params,
                         num_samples=num_samples),
                     needs=(insert.name,))
    return [slots, insert, decode]

  def static(stage, params, num_samples, suffixes):
    """generate._static's programs (a judge's orders): prefill, a decode step."""
    params = _with_stops(params, model.video)
    shape = (f"{batch} prompts x {num_samples}, {length} + "
             f"{suffixes[0].shape[1]} + {params.max_new_tokens} tokens")
    prefill = Program(f"{stage} prefill", shape, lambda _: sampler._prefill.trace(
        state, *prompts, *suffixes, num_samples=num_samples,
        max_new_tokens=params.max_new_tokens))
    decode = Program(f"{stage} decode", shape + ", per token",
                     lambda done: sampler._decode.trace(
                         state, *done[prefill.name], scalar, uids, scalar,
                         params=params, num_samples=num_samples),
                     needs=(prefill.name,))
    return [prefill, decode]

  answer, context = config.sampling.answer, config.sampling.context
  greedy = lambda n: sampling.SamplingParams(temperature=0.0, max_new_tokens=n)
  out = streamed("answers", settings.sampling_params(answer), 2)
  out += streamed("contexts", settings.sampling_params(context), 1)
  if config.self_judge.mode == "generative":
    out += static("judge", greedy(config.self_judge.max_new_tokens), 2, orders)
  else:
    out.append(Program("judge score", f"{batch} pairs, {length} + 2 x "
                       f"{shapes.suffix} tokens",
                       lambda _: sampler._score.trace(state, *prompts, *orders)))
  if config.eval.enabled:
    out += streamed("eval", greedy(answer.max_new_tokens), 1)
  return out


def _check_batches(config, mesh) -> None:
  """Each batch splits evenly over the mesh's batch shards (and micro-batches)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = config.train.grad_accum_steps
  for knob, rows in (("sampling.batch_size", config.sampling.batch_size),
                     ("sft.batch_size", config.sft.batch_size),
                     ("train.batch_size / train.grad_accum_steps",
                      config.train.batch_size / accum)):
    if rows % shards:
      raise PlanError(f"{knob} = {rows:g} rows do not split over the mesh's "
                      f"{shards} batch shards (data x fsdp)")


def training_programs(config, model: models.VideoLlava, mesh, shapes: Shapes,
                      dpo_steps: int) -> list[Program]:
  """The Trainer's programs: a training batch's video features, its reference
  log-probs and the DPO update (its micro-batches accumulated inside), and
  `isr-dpo sft`'s features and update. Under LoRA the updates also take the
  frozen model, and the iteration ends by merging the adapters into it."""
  trainer = train.Trainer(model, settings.dpo_train_config(config), mesh,
                          total_steps=dpo_steps)
  state = trainer.abstract_state()
  params = _model_params(trainer, state)
  base = () if trainer.base is None else (params,)
  batch_size, accum = config.train.batch_size, config.train.grad_accum_steps
  rows = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=trainer.batch_sharding)
  frames = lambda b: rows(b, *model.video.frames_shape, dtype=jnp.uint8)
  prompt = lambda b, length: (rows(b, length), rows(b, length, dtype=bool))
  pairs = batching.PreferenceBatch(
      *prompt(batch_size, shapes.dpo_prompt),
      *prompt(batch_size, shapes.dpo_response),
      *prompt(batch_size, shapes.dpo_response))
  reference = (rows(batch_size, dtype=jnp.float32),) * 2
  pair_rows = (f"{batch_size} pairs, {shapes.dpo_prompt} + 2 x "
               f"{shapes.dpo_response} tokens")
  out = [
      Program("train video features", f"{batch_size} videos",
              lambda _: trainer.encode_video.trace(params, frames(batch_size))),
      Program("reference log-probs", f"{pair_rows}, {accum} micro-batches",
              lambda done: trainer.pair_logps.trace(
                  params, pairs, done["train video features"]),
              needs=("train video features",)),
      Program("dpo update", f"{pair_rows}, {accum} micro-batches",
              lambda done: trainer.dpo_step.trace(
                  state, pairs, done["train video features"], *reference,
                  *base),
              needs=("train video features",)),
  ]
  if base:
    out.append(Program("merge adapters", "once per iteration",
                       lambda _: trainer.merge_adapters.trace(params,
                                                              state.params)))
  sft_trainer = train.Trainer(model, settings.sft_train_config(config), mesh,
                              total_steps=1000)
  sft_state = sft_trainer.abstract_state()
  sft_params = _model_params(sft_trainer, sft_state)
  sft_base = () if sft_trainer.base is None else (sft_params,)
  sft_size = config.sft.batch_size
  examples = batching.SftBatch(
      *prompt(sft_size, shapes.sft_prompt),
      *prompt(sft_size, shapes.sft_target),
      rows(sft_size, shapes.sft_target, dtype=bool))
  out += [
      Program("sft video features", f"{sft_size} videos",
              lambda _: sft_trainer.encode_video.trace(sft_params,
                                                       frames(sft_size))),
      Program("sft update", f"{sft_size} examples, {shapes.sft_prompt} + "
              f"{shapes.sft_target} tokens",
              lambda done: sft_trainer.sft_step.trace(
                  sft_state, examples, done["sft video features"],
                  *sft_base),
              needs=("sft video features",)),
  ]
  return out


def _model_params(trainer: train.Trainer, state: train.TrainState):
  """The model's parameters, placed: the trained ones, or under LoRA (where
  the state holds adapters) the frozen model's."""
  if trainer.base is None:
    return state.params
  return _placed(trainer.base, trainer.param_shardings)


# ---------------------------------------------------------------------------
# Compilation and analysis
# ---------------------------------------------------------------------------


def _matmul_cost(eqn: jax.extend.core.JaxprEqn) -> tuple[float, float]:
  """FLOPs and bytes read and written of a matrix product; (0, 0) otherwise."""
  if eqn.primitive.name != "dot_general":
    return 0.0, 0.0
  (contracting, _), _ = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  flops = 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contracting)
  return flops, sum(a.size * a.dtype.itemsize for a in (lhs, rhs, out))


def _matmul_costs(jaxpr: jax.extend.core.Jaxpr) -> tuple[np.ndarray, np.ndarray]:
  """[FLOPs, bytes] of the matrix products in `jaxpr`: with every `scan` run
  its length, and as XLA's cost analysis counts them, a loop's body once (a
  scan unrolled k times has k iterations in its body)."""
  every, once = np.zeros(2), np.zeros(2)
  for eqn in jaxpr.eqns:
    cost = _matmul_cost(eqn)
    every += cost
    once += cost
    trips, in_body = 1, 1
    if eqn.primitive.name == "scan":
      trips = eqn.params["length"]
      in_body = min(eqn.params["unroll"], trips)
    for inner in jax.extend.core.jaxprs_in_params(eqn.params):
      inner_every, inner_once = _matmul_costs(inner)
      every += trips * inner_every
      once += in_body * inner_once
  return every, once


def uncounted_iterations(jaxpr: jax.extend.core.Jaxpr) -> tuple[float, float]:
  """FLOPs and bytes of the scan iterations that XLA's cost analysis leaves
  out, over all chips: the matrix products (and their operands' and results'
  bytes) of every iteration after a `scan`'s first, nested scans included.

  XLA counts a loop's body once. A training program loops over micro-batches,
  over the decoder layers (llama._scan_layers) and over a long attention's
  query blocks, so its own count is one block of one layer of one
  micro-batch. Elementwise work in the left-out iterations is not added; a
  `while_loop`'s trip count is unknown, so a decode loop stays one step.
  """
  every, once = _matmul_costs(jaxpr)
  flops, bytes_accessed = every - once
  return float(flops), float(bytes_accessed)


@dataclasses.dataclass(frozen=True)
class Analysis:
  """A compiled program's memory per chip (bytes) and cost, as XLA gives them.

  `out_specs` are its outputs' PartitionSpecs, for the programs that take them.
  """
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  flops: float
  bytes_accessed: float
  out_specs: list

  @property
  def peak(self) -> int:
    """Bytes live at once: arguments, the outputs that do not reuse a donated
    argument's buffer, temporaries and the program itself."""
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.code)

  def seconds(self, chip: Chip) -> float:
    """Roofline time: its FLOPs at peak rate or its HBM traffic at full
    bandwidth, whichever takes longer."""
    return max(self.flops / chip.peak_flops,
               self.bytes_accessed / chip.hbm_bandwidth)

  @classmethod
  def of(cls, compiled: jax.stages.Compiled, jaxpr: jax.extend.core.ClosedJaxpr,
         num_chips: int) -> "Analysis":
    """XLA's analysis of `compiled`, its cost completed with the scan
    iterations XLA leaves out (`uncounted_iterations` of its `jaxpr`, shared
    evenly by the `num_chips` chips that run it); on a GPU target, where XLA
    gives no cost, the matrix products' alone."""
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    if cost is None:
      # XLA:GPU gives no cost for a program compiled from a target
      # description: its matrix products, every iteration, stand for it.
      cost = {}
      flops, bytes_accessed = _matmul_costs(jaxpr.jaxpr)[0]
    else:
      flops, bytes_accessed = uncounted_iterations(jaxpr.jaxpr)
    return cls(
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        code=memory.generated_code_size_in_bytes,
        flops=cost.get("flops", 0.0) + flops / num_chips,
        bytes_accessed=cost.get("bytes accessed", 0.0) + bytes_accessed / num_chips,
        out_specs=[[list(axis) if isinstance(axis, tuple) else axis
                    for axis in out.sharding.spec]
                   for out in jax.tree.leaves(compiled.out_info)])

  def abstract_outputs(self, lowered: jax.stages.Lowered, mesh):
    """The outputs' shapes with the shardings the compiler chose."""
    shapes = jax.tree.leaves(lowered.out_info)
    placed = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P(*[tuple(a) if isinstance(a, list) else a for a in spec])))
              for x, spec in zip(shapes, self.out_specs)]
    return jax.tree.unflatten(jax.tree.structure(lowered.out_info), placed)


def cache_dir() -> pathlib.Path:
  """`plan/` in JAX's compilation cache directory, else in ~/.cache/isr_dpo_jax."""
  root = jax.config.jax_compilation_cache_dir
  if root:
    return pathlib.Path(root) / "plan"
  return pathlib.Path.home() / ".cache" / "isr_dpo_jax" / "plan"


def _versions() -> str:
  libtpu = (importlib.metadata.version("libtpu")
            if importlib.util.find_spec("libtpu") else "none")
  return f"jax {jax.__version__}, libtpu {libtpu}"


# Changes when an Analysis of the same program changes: 2 adds the scans'
# uncounted iterations.
_ANALYSIS_FORMAT = "2"


def _cache_key(lowered: jax.stages.Lowered, mesh) -> str:
  digest = hashlib.sha256()
  for part in (_ANALYSIS_FORMAT, lowered.as_text(), _versions(),
               mesh.devices.flat[0].device_kind,
               repr([d.id for d in mesh.devices.flat]), repr(dict(mesh.shape))):
    digest.update(part.encode() + b"\0")
  return digest.hexdigest()


def _compile(lowered: jax.stages.Lowered, where: Target) -> jax.stages.Compiled:
  """The compiled program. For compile-only devices JAX's persistent cache
  would store an executable that it cannot load back: none is written."""
  if not where.compile_only:
    return lowered.compile()
  key = "jax_persistent_cache_min_compile_time_secs"
  least = getattr(jax.config, key)
  jax.config.update(key, math.inf)
  try:
    return lowered.compile(where.compiler_options)
  finally:
    jax.config.update(key, least)


@dataclasses.dataclass(frozen=True)
class Row:
  """One program of the plan: its analysis, or why it did not compile."""
  program: Program
  analysis: Analysis | None
  error: str | None = None


def analyse(programs: Sequence[Program], where: Target, mesh,
            cache: pathlib.Path | None,
            log=lambda line: print(line, file=sys.stderr)) -> list[Row]:
  """Lowers and compiles each program (or reads its analysis from `cache`).

  A program that XLA finds too large for the chip's memory gets its error
  instead, and the programs that take its outputs are not compiled.
  """
  done, rows = {}, []
  for program in programs:
    try:
      traced = program.trace(done)
    except KeyError as e:
      rows.append(Row(program, None, f"needs {e.args[0]}, which did not compile"))
      continue
    lowered = traced.lower()
    key = _cache_key(lowered, mesh)
    path = None if cache is None else cache / f"{key}.json"
    if path is not None and path.exists():
      analysis = Analysis(**json.loads(path.read_text()))
      log(f"{program.name}: from the plan cache")
    else:
      clock = time.perf_counter()
      try:
        analysis = Analysis.of(_compile(lowered, where),
                               traced.jaxpr, mesh.size)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        rows.append(Row(program, None, str(e).strip().splitlines()[0]))
        log(f"{program.name}: does not fit ({time.perf_counter() - clock:.0f} s)")
        continue
      log(f"{program.name}: compiled in {time.perf_counter() - clock:.0f} s")
      if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(analysis)))
        tmp.replace(path)
    done[program.name] = analysis.abstract_outputs(lowered, mesh)
    rows.append(Row(program, analysis))
  return rows


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def table(rows: Sequence[Row], chip: Chip | None) -> str:
  """The plan as a Markdown table, per chip."""
  gib = lambda x: f"{x / GiB:.3g}"
  hbm = "-" if chip is None else gib(chip.hbm_bytes)
  lines = ["| program | runs on | arguments GiB | temporaries GiB | peak GiB "
           "| HBM GiB | fits | TFLOP | GB | roofline s |",
           "|---|---|--:|--:|--:|--:|---|--:|--:|--:|"]
  for row in rows:
    a = row.analysis
    if a is None:
      lines.append(f"| {row.program.name} | {row.program.shape} | | | | {hbm} "
                   f"| no: {row.error} | | | |")
      continue
    if chip is None:
      fits, seconds = "-", "-"
    else:
      share = a.peak / chip.hbm_bytes
      fits = f"{'yes' if share <= FITS else 'NO'} ({share:.0%})"
      seconds = f"{a.seconds(chip):.3g}"
    lines.append(
        f"| {row.program.name} | {row.program.shape} | {gib(a.arguments)} "
        f"| {gib(a.temporaries)} | {gib(a.peak)} | {hbm} | {fits} "
        f"| {a.flops / 1e12:.3g} | {a.bytes_accessed / 1e9:.3g} | {seconds} |")
  return "\n".join(lines)


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h"


def iteration_estimate(config, rows: Sequence[Row], chip: Chip) -> str:
  """One ISR-DPO iteration's time from its programs' rooflines."""
  t = {row.program.name: row.analysis.seconds(chip) for row in rows
       if row.analysis is not None}
  prompts = config.data.prompts_per_iteration or 1000
  batches = lambda n, size: math.ceil(n / size)
  sampling_batch, train_batch = config.sampling.batch_size, config.train.batch_size
  s, accum = config.sampling, config.train.grad_accum_steps
  generate = lambda stage, steps: t[f"{stage} prefill"] + steps * t[f"{stage} decode"]
  if config.self_judge.mode == "generative":
    judging = ("(prefill + {} decode steps)".format(config.self_judge.max_new_tokens),
               generate("judge", config.self_judge.max_new_tokens))
  else:
    judging = ("scoring passes", t["judge score"])
  dpo_steps = batches(config.train.epochs * prompts, train_batch)
  stages_ = [
      ("answers", batches(prompts, sampling_batch),
       f"(prefill + {s.answer.max_new_tokens} decode steps)",
       generate("answers", s.answer.max_new_tokens)),
      ("contexts", batches(prompts, sampling_batch),
       f"(prefill + {s.context.max_new_tokens} decode steps)",
       generate("contexts", s.context.max_new_tokens)),
      ("judgments", batches(prompts, sampling_batch), *judging),
      ("reference", batches(prompts, train_batch),
       f"(features + {accum} micro-batches)",
       t["train video features"] + t["reference log-probs"]),
      ("dpo", dpo_steps, f"(features + {accum} micro-batches)",
       t["train video features"] + t["dpo update"]),
  ]
  if "merge adapters" in t:
    stages_.append(("merge", 1, "(LoRA adapters into the model)",
                    t["merge adapters"]))
  total = sum(n * seconds for _, n, _, seconds in stages_)
  source = ("" if config.data.prompts_per_iteration
            else " (data.prompts_per_iteration is 0: every prompt; per 1000)")
  lines = [f"One ISR-DPO iteration of {prompts} prompts{source}, at the "
           f"programs' rooflines: {_hours(total)}"]
  lines += [f"  {name:10s} {n:6d} x {what:34s} {_hours(n * seconds):>9s}"
            for name, n, what, seconds in stages_]
  lines.append(
      "Counted as if every prompt had its own video, every sample ran to "
      "max_new_tokens at the longest prompt, and the judge kept every pair. "
      "Left out: collectives between chips, host work (decoding videos, "
      "tokenising, Python between batches), evaluation, compilation and "
      "checkpoints, and the work besides matrix products in a scan's "
      "iterations after its first.")
  return "\n".join(lines)


def _with_needs(programs: Sequence[Program], names) -> list[Program]:
  """The programs named and those whose outputs they take, in run order."""
  unknown = set(names) - {p.name for p in programs}
  if unknown:
    raise PlanError(f"no program named {', '.join(sorted(unknown))}: the "
                    f"run's are {', '.join(p.name for p in programs)}")
  wanted = set(names)
  for program in reversed(programs):
    if program.name in wanted:
      wanted.update(program.needs)
  return [p for p in programs if p.name in wanted]


def plan(config, topology: str | None, *, cache: pathlib.Path | None = None,
         programs: Sequence[str] | None = None,
         log=lambda line: print(line, file=sys.stderr)) -> tuple[Target, list[Row]]:
  """Compiles every program of a run of `config` for `topology` (or the
  `programs` named, and those they take outputs from)."""
  where = target(topology)
  mesh = make_mesh(config, where)
  _check_batches(config, mesh)
  model_cfg, source = model_config(config)
  log(f"plan: {source} on {where.name}, mesh {dict(mesh.shape)}")
  model = abstract_model(config, model_cfg)
  shapes = run_shapes(config, model.video.num_tokens)
  dpo_steps = math.ceil(config.train.epochs * (config.data.prompts_per_iteration
                                               or 1000) / config.train.batch_size)
  run = (sampling_programs(config, model, mesh, shapes)
         + training_programs(config, model, mesh, shapes, dpo_steps))
  if programs is not None:
    run = _with_needs(run, programs)
  return where, analyse(run, where, mesh, cache, log)


def report(config, where: Target, rows: Sequence[Row]) -> str:
  """The table and, on a known chip, the iteration's estimate."""
  text = [f"Plan for {where.name}, mesh {dict(config.mesh)}; memory and cost "
          "per chip.", "", table(rows, where.chip), ""]
  if where.chip is None:
    text.append(f"No roofline: {where.devices[0].device_kind} is not in the "
                "chip table.")
  elif all(row.analysis is not None for row in rows):
    try:
      text.append(iteration_estimate(config, rows, where.chip))
    except KeyError as e:
      text.append(f"No iteration estimate: {e.args[0]} was not planned.")
  return "\n".join(text)


def main(config, workdir: str | None, topology: str | None = None) -> None:
  """`isr-dpo plan`: prints the plan of a run of `config` on `topology`."""
  del workdir  # a plan writes nothing but its cache
  where, rows = plan(config, topology, cache=cache_dir())
  print(report(config, where, rows))
