"""Supervised fine-tuning: `isr-dpo sft --config=configs/<name>.py --workdir=<dir>`.

Trains pi_0 on instruction jsonl (ShareGPTVideo QA/caption conversations) with
the DPO trainer's machinery (masked cross-entropy on the answers) and writes
`<workdir>/model` in the Hugging Face layout with its tokenizer: the starting
checkpoint of `isr-dpo iterate`. Killed runs resume from the last checkpoint.
"""
import logging
import math
import os
import pathlib

from flax import nnx
import jax.numpy as jnp
import ml_collections

from isr_dpo_jax import bootstrap
from isr_dpo_jax import checkpoint
from isr_dpo_jax import metrics as metrics_lib
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.data import loader as loader_lib
from isr_dpo_jax.data import video_cache


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  run(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """Fine-tunes and saves; returns the saved model's directory."""
  workdir = pathlib.Path(workdir)
  out = workdir / "model"
  if (out / "config.json").exists():
    return out
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = bootstrap.prepare(config, workdir)
  model, tokenizer, encoder = policy_lib.load_model(
      setup.init_checkpoint, mesh=mesh, template=config.data.template,
      max_length=config.data.max_length, family=config.model.family,
      dtype=jnp.dtype(config.model.dtype))
  frames = video_cache.Frames(setup.video_root, model.video.num_frames,
                              model.video.frame_size)
  source = loader_lib.JsonlSource(setup.sft_data, "qa", frames, config.data.max_error_rate)
  cfg = config.sft
  num_steps = math.ceil(cfg.epochs * len(source) / cfg.batch_size)
  trainer = train.Trainer(model, settings.sft_train_config(config), mesh, total_steps=num_steps)
  batches = iter(loader_lib.Loader(source, "sft", encoder, cfg.batch_size,
                                   seed=config.seed, num_epochs=None,
                                   buckets=config.sampling.buckets))
  with checkpoint.Checkpointer(workdir / "checkpoints",
                               save_interval_steps=config.train.checkpoint_every) as ckpt, \
       metrics_lib.MetricsWriter(workdir / "train") as writer:
    state = train.restore_or_init(trainer, model, ckpt, batches, config.seed)
    state = train.fit(lambda s, b: trainer.sft_update(s, b.text, b.frames), state,
                      batches, num_steps=num_steps, checkpointer=ckpt, writer=writer,
                      desc="sft")
  params = nnx.state(model)
  nnx.replace_by_pure_dict(params, trainer.model_params(state))  # LoRA: merged
  nnx.update(model, params)
  models.save_pretrained(model, out, tokenizer=tokenizer)
  logging.info("sft: %d steps on %d records -> %s", num_steps, len(source), out)
  return out
