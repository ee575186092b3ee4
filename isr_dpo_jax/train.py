"""DPO and SFT training: optimizer, frozen parameter groups, the sharded update.

One optimizer update is one jitted call over the ('data', 'fsdp', 'tensor')
mesh, with explicit in/out shardings and the train state donated. A frozen
video tower runs in its own jitted call before the update (`encode_video`),
so its features enter the differentiated function as data: the tower is
never differentiated and runs once per example per epoch, not once per
response or per microbatch pass. The projector always runs inside (it is
cheap, and trainable in SFT); a trainable tower (`frozen` leaves it out)
runs inside too, on the frames. `_video_embeddings` tells the two apart.

Gradient accumulation is a `lax.scan` over microbatches inside the update
(rather than optax.MultiSteps): one dispatch and one optimizer step per
global batch, no accumulator in the checkpointed optimizer state, and the
step counter and learning-rate schedule count real updates. Microbatch j takes
rows j, j + A, j + 2A, ... so that each device's rows split evenly.

Frozen parameters (`frozen` names the model's parameter groups, e.g.
"video_tower" and "projector" (models/interface.py), or gives regexes over
parameter paths such as `language_model/layers/3/mlp/up_proj/kernel`) get
`optax.set_to_zero` in an `optax.multi_transform`, hence no optimizer state,
and a stop_gradient in the forward pass, hence no gradient computation.

bf16 compute with float32 master weights is a property of the model: load it
with `dtype=jnp.bfloat16, param_dtype=jnp.float32`; parameters, gradients and
optimizer state stay float32 while matmuls run in bfloat16.

Rows that the loader fills with dummies (a record that failed to load, a
short last batch; `is_real` False) count for nothing: losses and metrics are
means over the real pairs (SFT: the real tokens) of the whole global batch,
whatever the microbatching.

LoRA (`TrainConfig.lora`, lora.py): the state's params are the adapters, the
only differentiated inputs and the only ones with optimizer state; the model's
parameters are the frozen base, an argument of every step, never in the state
or its checkpoints. `Trainer.model_params` merges the adapters into the base.
"""
from collections.abc import Callable, Iterable, Iterator
import functools
import re
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from isr_dpo_jax import checkpoint
from isr_dpo_jax import distributed
from isr_dpo_jax import dpo
from isr_dpo_jax import lora as lora_lib
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax import packing
from isr_dpo_jax import parallel
from isr_dpo_jax.settings import TrainConfig  # with the other typed settings, jax-free
from isr_dpo_jax.data import batching
from isr_dpo_jax.data import video
from isr_dpo_jax.models import interface
from isr_dpo_jax.models import layers


@flax.struct.dataclass
class TrainState:
  """Everything an update changes; checkpointed as one pytree."""
  step: jax.Array  # int32 scalar: optimizer updates done.
  params: dict  # what trains: the model's (`nnx.to_pure_dict`) or LoRA adapters.
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data, for stochastic layers and sampling.


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


def path_name(path) -> str:
  """'language_model/layers/0/mlp/up_proj/kernel' from a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_mask(params, frozen: Iterable[str], groups: dict[str, str]):
  """True for each parameter in a `frozen` entry: a name of `groups` (a
  model's `parameter_groups`) or else a regex over parameter paths."""
  regexes = [re.compile(groups.get(entry, entry)) for entry in frozen]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(r.search(path_name(path)) for r in regexes), params)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`.

  As HF's schedulers: warmup = ceil(ratio * total), the first update uses
  the schedule at 0.
  """
  warmup = int(np.ceil(config.warmup_ratio * total_steps))
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total_steps, warmup + 1))
  if config.schedule != "linear":
    raise ValueError(f"schedule {config.schedule!r} is not linear or cosine")
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.linear_schedule(config.learning_rate, 0.0,
                             max(total_steps - warmup, 1))], [warmup])


def make_optimizer(config: TrainConfig, schedule: optax.Schedule,
                   frozen) -> optax.GradientTransformation:
  """Clipped AdamW on trainable parameters, nothing (and no state) on frozen."""
  adamw = optax.adamw(
      schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
      weight_decay=config.weight_decay,
      mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
  if config.max_grad_norm is not None:
    adamw = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
  labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
  return optax.multi_transform(
      {"trained": adamw, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------
# Objectives on a model (pure; differentiated inside the update)
# ---------------------------------------------------------------------------


def _video_embeddings(model, visual):
  """Projected video embeddings [B, N, D] from what `Trainer.encode_video` gave:
  the frozen tower's features [B, N, Dv], or frames [B, T, H, W, 3]."""
  if visual.ndim == 3:
    return model.project(visual)
  return model.encode_video(visual)


def remat_policy(name: str | None):
  """train.remat's policy for each decoder layer: None (store everything), a
  `jax.checkpoint_policies` name, or "offload_layer_inputs": nothing kept on
  the device but each layer's input, which waits in the host's memory
  (pinned_host) for the backward pass, where a 7B micro-batch's 32 inputs
  would hold 1.25 GiB of a v5e chip's 16 GB."""
  if name is None:
    return None
  if name == "offload_layer_inputs":
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(layers.LAYER_INPUT,),
        offload_src="device", offload_dst="pinned_host")
  return getattr(jax.checkpoint_policies, name)


def _logits(model, rows: packing.Rows, visual, remat: str | None = None):
  """Logits of the outputs that predict response tokens: [R*B, T, V].

  The output head runs on those positions only, never on the long prompt.
  Its input and output keep their rows on the batch axes (as each decoder
  layer's do): left free, XLA gathers every device's logit gradients to each
  weight shard in the backward pass (a 7B micro-batch of 16 pairs: 1000 MiB,
  twice) instead of reducing the head's weight gradient.
  """
  feats_BxNxD = _video_embeddings(model, visual)
  feats_NxMxD = jnp.tile(feats_BxNxD,
                         (rows.ids.shape[0] // feats_BxNxD.shape[0], 1, 1))
  x_NxLxD = model.embed(rows.ids, feats_NxMxD)
  hidden_NxLxD, _ = model.hidden_states(x_NxLxD, rows.positions, rows.mask,
                                        remat_policy=remat_policy(remat))
  hidden_RNxTxD = parallel.shard_rows(packing.read_responses(hidden_NxLxD, rows))
  return parallel.shard_rows(model.logits(hidden_RNxTxD))


def pair_logps(model, batch: batching.PreferenceBatch, feats_BxNxD, *,
               packed: bool):
  """Summed log-probs of the chosen and of the rejected responses, [B] each."""
  rows = packing.dpo_rows(batch, packed=packed)
  sum_2B, _, _ = dpo.response_logps(_logits(model, rows, feats_BxNxD),
                                    rows.targets, rows.target_mask)
  return tuple(jnp.split(sum_2B, 2))


def model_dpo_loss(model, batch: batching.PreferenceBatch, feats_BxNxD,
                  reference_chosen_B, reference_rejected_B,
                  config: TrainConfig, *, num_pairs, num_chosen_tokens):
  """`dpo.dpo_objective` of `model`'s response logits: (loss, metrics), this
  batch's share of the objective of a batch of `num_pairs` real pairs and
  `num_chosen_tokens` chosen tokens. The reference log-probs are data."""
  rows = packing.dpo_rows(batch, packed=config.packed)
  return dpo.dpo_objective(
      _logits(model, rows, feats_BxNxD, config.remat), rows.targets,
      rows.target_mask, reference_chosen_B, reference_rejected_B,
      batch.is_real, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
      dpo_alpha=config.dpo_alpha, gamma=config.gamma,
      **config.dpo_loss_options())


def model_sft_loss(model, batch: batching.SftBatch, feats_BxNxD, *,
                   num_tokens, remat: str | None = None):
  """`dpo.sft_objective` of `model`'s target logits: this batch's share of
  the token-mean cross-entropy over `num_tokens`."""
  rows = packing.plain_rows(batch.prompt_ids, batch.prompt_mask,
                            batch.target_ids[None], batch.target_mask[None])
  return dpo.sft_objective(_logits(model, rows, feats_BxNxD, remat),
                           rows.targets, batch.loss_mask, num_tokens=num_tokens)


# ---------------------------------------------------------------------------
# The compiled update
# ---------------------------------------------------------------------------


def _microbatches(tree, num: int):
  """[B, ...] -> [num, B / num, ...]; microbatch j holds rows j, j+num, ..."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"{num} microbatches")
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, tree)


def _map_microbatches(fn, inputs, num: int):
  """`fn` over `_microbatches(inputs, num)`, one microbatch at a time (a loop,
  so one microbatch's temporaries are live at once); its per-row outputs,
  [B / num, ...] each, are put back in the rows' order: [B, ...]."""
  out = jax.lax.map(fn, _microbatches(inputs, num))
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), out)


def _accumulate(grad_fn, params, inputs, num: int):
  """Sum of grad_fn(params, micro) -> (grads, metrics) over microbatches."""
  micro = _microbatches(inputs, num)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first))

  def add(total, one_micro):
    return jax.tree.map(jnp.add, total, grad_fn(params, one_micro)), None

  total, _ = jax.lax.scan(add, zeros, micro)
  return total


class Trainer:
  """The jitted, sharded DPO and SFT updates of one model on one mesh.

  Usage, with host batches from `data.loader` (uint8 frames):
    trainer = Trainer(model, config, mesh, total_steps=...)
    state = trainer.init_state(model)
    ref = trainer.reference_logps(state.params, batch, frames)  # pi_t, once
    state, metrics = trainer.dpo_update(state, batch, frames, *ref)
    params = trainer.model_params(state)  # pi_{t+1}: a plain model's params

  Under LoRA the model's parameters, as `model` holds them (`trainer.base`;
  None in full fine-tuning), are the frozen base of every update and
  `state.params` are the adapters; the jitted steps then take the base as
  their last argument (its shapes, to lower them from abstract shapes).

  `reference_logps` runs before training, in the update's microbatches, and
  its results are stored with the pairs, so no reference model stays
  resident. For on-the-fly reference log-probs, keep a frozen copy of the
  initial params on the mesh and pass it as
  `dpo_update(..., reference_params=...)`. The jitted pieces
  (`encode_video`, `pair_logps`, `dpo_step`, `sft_step`, `merge_adapters`)
  take global arrays.
  """

  def __init__(self, model: interface.VideoLanguageModel, config: TrainConfig,
               mesh: jax.sharding.Mesh, *, total_steps: int):
    self.config = config
    self.mesh = mesh
    self.graphdef, params = nnx.split(model)
    self.param_shardings = nnx.to_pure_dict(parallel.state_shardings(params, mesh))
    self._abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
    self.base = nnx.to_pure_dict(params) if config.lora.rank else None
    trained = jax.eval_shape(self._trained_params, self._abstract_params, 0)
    groups = model.parameter_groups
    self.frozen = frozen_mask(trained, config.frozen if self.base is None else (), groups)
    # Under LoRA the tower trains only if it has adapters.
    tower = frozen_mask(trained, (interface.VIDEO_TOWER,), groups)
    self.tower_frozen = all(f for f, t in zip(jax.tree.leaves(self.frozen),
                                              jax.tree.leaves(tower)) if t)
    self.schedule = learning_rate_schedule(config, total_steps)
    self.tx = make_optimizer(config, self.schedule, self.frozen)
    trained_shardings = (self.param_shardings if self.base is None else
                         lora_lib.shardings(trained, self.param_shardings))
    self.state_shardings = self._state_shardings(trained, trained_shardings)

    self.batch_sharding = batch_sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    state_sh, params_sh = self.state_shardings, self.param_shardings
    base_sh = () if self.base is None else (params_sh,)
    self.encode_video = jax.jit(
        self._encode_video, in_shardings=(params_sh, batch_sharding),
        out_shardings=batch_sharding)
    self.pair_logps = jax.jit(
        parallel.on_mesh(self._pair_logps, self.mesh),
        in_shardings=(params_sh, batch_sharding, batch_sharding), out_shardings=batch_sharding)
    self.dpo_step = jax.jit(
        parallel.on_mesh(self._dpo_step, self.mesh), donate_argnums=0,
        out_shardings=(state_sh, replicated),
        in_shardings=(state_sh,) + (batch_sharding,) * 4 + base_sh)
    self.sft_step = jax.jit(
        parallel.on_mesh(self._sft_step, self.mesh), donate_argnums=0,
        out_shardings=(state_sh, replicated),
        in_shardings=(state_sh, batch_sharding, batch_sharding) + base_sh)
    self.merge_adapters = jax.jit(
        self._merge_adapters, in_shardings=(params_sh, trained_shardings),
        out_shardings=params_sh)

  # -- state ------------------------------------------------------------------

  def _state_shardings(self, abstract_trained, trained_shardings) -> TrainState:
    replicated = NamedSharding(self.mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda p, s: p if masked(p) else s,
        jax.eval_shape(self.tx.init, abstract_trained), trained_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)
    return TrainState(step=replicated, params=trained_shardings,
                      opt_state=opt_shardings, rng=replicated)

  def _trained_params(self, params, seed):
    """What the optimizer updates: `params`, or new LoRA adapters for them."""
    if self.base is None:
      return params
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return lora_lib.init(params, self.config.lora, key)

  def _init(self, params, seed: int = 0) -> TrainState:
    trained = self._trained_params(params, seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained,
                      opt_state=self.tx.init(trained),
                      rng=jax.random.key_data(jax.random.key(seed)))

  def init_state(self, model: nnx.Module, seed: int = 0) -> TrainState:
    """The step-0 state of `model`'s parameters, placed on the mesh."""
    init = jax.jit(self._init, static_argnums=1,
                   out_shardings=self.state_shardings)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model)),
                            self.param_shardings)
    return init(params, seed)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: a checkpoint restore target."""
    return checkpoint.abstract_like(
        jax.eval_shape(self._init, self._abstract_params), self.state_shardings)

  def model(self, params) -> nnx.Module:
    """The NNX model with `params` (e.g. to save or sample from it)."""
    return nnx.merge(self.graphdef, params)

  def model_params(self, state: TrainState) -> dict:
    """The trained model's parameters: `state.params`, or under LoRA the base
    with the adapters merged in (a plain model, the base's tree and dtypes)."""
    if self.base is None:
      return state.params
    return self.merge_adapters(*self._frozen_base(), state.params)

  # -- host-side entry points --------------------------------------------------

  def dpo_update(self, state: TrainState, batch: batching.PreferenceBatch,
                 frames, reference_chosen=None, reference_rejected=None, *,
                 reference_params=None) -> tuple[TrainState, dict]:
    """One DPO update on a host batch: encode the videos, then the step."""
    batch, frames = self._global((batch, frames))
    base = self._frozen_base()
    feats = self.encode_video(base[0] if base else state.params, frames)
    if reference_params is None:
      reference = self._global((reference_chosen, reference_rejected))
    else:  # the reference sees the videos through its own tower
      reference = self.pair_logps(reference_params, batch,
                                  self.encode_video(reference_params, frames))
    return self.dpo_step(state, batch, feats, *reference, *base)

  def sft_update(self, state: TrainState, batch: batching.SftBatch, frames
                 ) -> tuple[TrainState, dict]:
    """One SFT update on a host batch."""
    batch, frames = self._global((batch, frames))
    base = self._frozen_base()
    feats = self.encode_video(base[0] if base else state.params, frames)
    return self.sft_step(state, batch, feats, *base)

  def reference_logps(self, params, batch: batching.PreferenceBatch, frames
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of this host's chosen and rejected rows under params."""
    batch, frames = self._global((batch, frames))
    logps = self.pair_logps(params, batch, self.encode_video(params, frames))
    return tuple(np.asarray(x) for x in multihost_utils.global_array_to_host_local_array(
        logps, self.mesh, P(parallel.BATCH_AXES)))

  def _frozen_base(self) -> tuple:
    """The steps' trailing arguments: (), or under LoRA the base on the mesh."""
    if self.base is None:
      return ()
    return (jax.device_put(self.base, self.param_shardings),)

  def _global(self, host_tree):
    """Global arrays sharded over the batch axes from per-host rows."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(x)), host_tree)

  # -- compiled functions -------------------------------------------------------

  def _encode_video(self, params, videos_BxTxHxWx3):
    """The frozen tower's features, or the frames for a trainable tower."""
    if videos_BxTxHxWx3.dtype == jnp.uint8:  # frames from the loader
      videos_BxTxHxWx3 = video.normalize(videos_BxTxHxWx3)
    if not self.tower_frozen:
      return videos_BxTxHxWx3
    return self.model(params).tower_features(videos_BxTxHxWx3)

  def _pair_logps(self, params, batch, feats_BxNxD):
    """`pair_logps` in the update's microbatches (train.grad_accum_steps), so
    that the reference pass holds no more activations than the update."""
    return _map_microbatches(
        lambda micro: pair_logps(self.model(params), *micro,
                                 packed=self.config.packed),
        (batch, feats_BxNxD), self.config.grad_accum_steps)

  def _merge_adapters(self, base, adapters):
    return lora_lib.merge(base, adapters, self.config.lora.scale)

  def _trainable_model(self, params, base=None) -> nnx.Module:
    """The model as a function of the trained `params`: frozen groups behind
    stop_gradient, or under LoRA the `base` with adapters `params` attached."""
    if base is not None:
      return lora_lib.attach(self.model(base), params, self.config.lora.scale)
    frozen_or_not = jax.tree.map(
        lambda p, f: jax.lax.stop_gradient(p) if f else p, params, self.frozen)
    return self.model(frozen_or_not)

  def _grad_fn(self, objective, base=None):
    """(params, micro) -> (grads, metrics) of `objective(model, *micro)`."""
    def grad_fn(params, micro):
      return jax.grad(
          lambda p: objective(self._trainable_model(p, base), *micro),
          has_aux=True)(params)
    return grad_fn

  def _dpo_step(self, state: TrainState, batch, feats_BxNxD,
                reference_chosen_B, reference_rejected_B, base=None):
    objective = functools.partial(
        model_dpo_loss, config=self.config,
        num_pairs=jnp.maximum(batch.is_real.sum(), 1),
        num_chosen_tokens=jnp.maximum(batch.chosen_mask.sum(), 1))
    inputs = (batch, feats_BxNxD, reference_chosen_B, reference_rejected_B)
    grads, metrics = _accumulate(self._grad_fn(objective, base), state.params,
                                 inputs, self.config.grad_accum_steps)
    num_tokens = (batch.prompt_mask.sum() + batch.chosen_mask.sum()
                  + batch.rejected_mask.sum())
    return self._apply(state, grads, metrics, num_tokens)

  def _sft_step(self, state: TrainState, batch, feats_BxNxD, base=None):
    objective = functools.partial(
        model_sft_loss, num_tokens=jnp.maximum(batch.loss_mask.sum(), 1),
        remat=self.config.remat)
    grads, metrics = _accumulate(self._grad_fn(objective, base), state.params,
                                 (batch, feats_BxNxD),
                                 self.config.grad_accum_steps)
    num_tokens = batch.prompt_mask.sum() + batch.target_mask.sum()
    return self._apply(state, grads, metrics, num_tokens)

  def _apply(self, state: TrainState, grads, metrics, num_tokens):
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    metrics |= {"grad_norm": optax.tree.norm(grads),
                "learning_rate": self.schedule(state.step),
                "tokens": num_tokens}
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, metrics


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def restore_or_init(trainer: Trainer, model: nnx.Module,
                    checkpointer: checkpoint.Checkpointer | None, batches,
                    seed: int = 0) -> TrainState:
  """The last checkpoint's state (and data position), else a fresh state."""
  if checkpointer is None or checkpointer.latest_step() is None:
    return trainer.init_state(model, seed)
  state, data_state = checkpointer.restore(trainer.abstract_state())
  if data_state:
    batches.set_state(data_state)
  return state


def fit(update: Callable[[TrainState, Any], tuple[TrainState, dict]],
        state: TrainState, batches: Iterator, *, num_steps: int,
        checkpointer: checkpoint.Checkpointer | None = None,
        writer: metrics_lib.MetricsWriter | None = None,
        desc: str = "train") -> TrainState:
  """Runs `update(state, next(batches))` until `state.step == num_steps`.

  Metrics are fetched one step late, so the host never waits on the step it
  just dispatched; tokens/s is measured between fetches. The checkpointer
  saves the state with the data iterator's state (`batches.get_state()`) on
  its interval and at the last step. A saved step's metrics are written as
  soon as its save returns (which waited for the step), not one step later:
  the checkpoint is then still being written in the background, so a run
  killed once it has landed has all but surely written the step's row, and
  the resumed run, which starts after that step, leaves no gap.
  """
  start = int(state.step)
  pending = None
  with tqdm.tqdm(total=num_steps, initial=start, desc=desc,
                 disable=not distributed.is_main_process()) as bar:
    clock = time.perf_counter()
    for step in range(start + 1, num_steps + 1):
      state, step_metrics = update(state, next(batches))
      if pending is not None:
        clock = _log(*pending, clock, bar, writer)
      pending = (step, step_metrics)
      if checkpointer is not None and checkpointer.save(
          step, state, _data_state(batches), force=step == num_steps):
        clock = _log(*pending, clock, bar, writer)
        pending = None
    if pending is not None:
      _log(*pending, clock, bar, writer)
  if checkpointer is not None:
    checkpointer.wait()
  return state


def _data_state(batches) -> dict | None:
  return batches.get_state() if hasattr(batches, "get_state") else None


def _log(step, step_metrics, clock, bar, writer) -> float:
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  now = time.perf_counter()
  values["tokens_per_second"] = values["tokens"] / (now - clock)
  if writer is not None:
    writer.write(step, values)
  bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
  bar.update(1)
  return now
