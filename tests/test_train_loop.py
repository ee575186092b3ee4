"""The training loop: DPO learns a preference rule; a killed run resumes exactly."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isr_dpo_jax import checkpoint, metrics, models, parallel, train
from isr_dpo_jax.data import batching

VIDEO_ID = 95
BATCH = 8
CONFIG = train.TrainConfig(learning_rate=3e-3, warmup_ratio=0.0, beta=0.1)
MODEL_CONFIG = models.VideoLlavaConfig(
    text=models.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2),
    vision=models.VisionConfig(hidden_size=16, intermediate_size=32,
                               num_layers=2, num_heads=2, image_size=28,
                               patch_size=14, num_frames=2,
                               temporal_attention=False),
    video_token_id=VIDEO_ID)


def _rule_pairs(num_pairs, seed):
  """Chosen answers use even tokens only, rejected ones odd tokens only.

  Two tokens and eos (2) each, after a prompt of the video and one random
  token; a rule that held-out pairs share with the training pairs.
  """
  rng = np.random.default_rng(seed)
  n_video = MODEL_CONFIG.num_video_tokens
  prompt = np.concatenate(
      [np.ones((num_pairs, 1)), np.full((num_pairs, n_video), VIDEO_ID),
       rng.integers(10, 60, (num_pairs, 1))], axis=1).astype(np.int32)
  eos = np.full((num_pairs, 1), 2)
  even = 2 * rng.integers(5, 15, (num_pairs, 2))
  chosen = np.concatenate([even, eos], axis=1)
  rejected = np.concatenate([2 * rng.integers(5, 15, (num_pairs, 2)) + 1, eos],
                            axis=1)
  frames = rng.integers(0, 256, (num_pairs, 2, 28, 28, 3), dtype=np.uint8)
  batch = batching.PreferenceBatch(
      prompt, np.ones(prompt.shape, bool), chosen.astype(np.int32),
      np.ones(chosen.shape, bool), rejected.astype(np.int32),
      np.ones(rejected.shape, bool))
  return batch, frames


class ListIterator:
  """Cycles over a list of batches; its state is the next index (as grain's)."""

  def __init__(self, items, stop_after=None):
    self.items, self.index, self.stop_after = items, 0, stop_after

  def __next__(self):
    if self.stop_after is not None and self.index == self.stop_after:
      raise KeyboardInterrupt("killed")
    item = self.items[self.index % len(self.items)]
    self.index += 1
    return item

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def _sharded(make_model, mesh):
  """`make_model()` with every parameter created on its shard."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  shardings = parallel.state_shardings(abstract, mesh)
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make_model()),
                                     out_shardings=shardings)())


@pytest.fixture(scope="module")
def setup():
  mesh = parallel.make_mesh({"fsdp": -1})
  model = _sharded(
      lambda: models.VideoLlava(MODEL_CONFIG, rngs=nnx.Rngs(0)), mesh)
  trainer = train.Trainer(model, CONFIG, mesh, total_steps=30)
  batch, frames = _rule_pairs(4 * BATCH, seed=0)
  params = nnx.to_pure_dict(nnx.state(model))
  items = []
  for i in range(4):
    rows = slice(i * BATCH, (i + 1) * BATCH)
    part = jax.tree.map(lambda x: x[rows], batch)
    items.append((part, frames[rows],
                  *trainer.reference_logps(params, part, frames[rows])))
  return dict(model=model, trainer=trainer, items=items)


def _update(trainer):
  return lambda state, item: trainer.dpo_update(state, *item)


def test_dpo_learns_a_preference_rule(setup, tmp_path):
  trainer, model = setup["trainer"], setup["model"]
  with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
    state = train.fit(_update(trainer), trainer.init_state(model),
                      ListIterator(setup["items"]), num_steps=30, writer=writer)
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 31))
  assert rows[0]["rewards/accuracies"] < 0.9  # policy == reference at first
  assert min(r["rewards/accuracies"] for r in rows[-5:]) > 0.9
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert all(r["tokens_per_second"] > 0 for r in rows)
  # The rule carries over to pairs never trained on.
  held_out, frames = _rule_pairs(2 * BATCH, seed=1)
  initial = nnx.to_pure_dict(nnx.state(model))
  policy = trainer.reference_logps(state.params, held_out, frames)
  reference = trainer.reference_logps(initial, held_out, frames)
  margins = (policy[0] - reference[0]) - (policy[1] - reference[1])
  assert np.mean(margins > 0) > 0.9


def test_killed_run_resumes_exactly(setup, tmp_path):
  trainer, model, items = setup["trainer"], setup["model"], setup["items"]
  update = _update(trainer)
  expected = train.fit(update, trainer.init_state(model), ListIterator(items),
                       num_steps=6)

  directory = tmp_path / "checkpoints"
  with checkpoint.Checkpointer(directory, save_interval_steps=2) as ckpt:
    with pytest.raises(KeyboardInterrupt):
      train.fit(update, trainer.init_state(model),
                ListIterator(items, stop_after=5), num_steps=6,
                checkpointer=ckpt)
  with checkpoint.Checkpointer(directory, save_interval_steps=2) as ckpt:
    assert ckpt.latest_step() == 4
    batches = ListIterator(items)
    state = train.restore_or_init(trainer, model, ckpt, batches)
    assert int(state.step) == 4 and batches.index == 4
    resumed = train.fit(update, state, batches, num_steps=6, checkpointer=ckpt)
    assert ckpt.latest_step() == 6
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("killed_at", [5, 7])
def test_killed_run_records_each_step_once(setup, tmp_path, killed_at):
  """Killed right after the checkpoint at step 4 (5) or two steps later (7)."""
  trainer, model, items = setup["trainer"], setup["model"], setup["items"]

  def run(batches):
    with checkpoint.Checkpointer(tmp_path / "ckpt", save_interval_steps=4) as ckpt, \
         metrics.MetricsWriter(tmp_path, enabled=True) as writer:
      state = train.restore_or_init(trainer, model, ckpt, batches)
      train.fit(_update(trainer), state, batches, num_steps=8, checkpointer=ckpt,
                writer=writer)

  with pytest.raises(KeyboardInterrupt):
    run(ListIterator(items, stop_after=killed_at - 1))
  run(ListIterator(items))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def test_restore_onto_another_mesh_shape(setup, tmp_path):
  """A train state saved on one mesh restores exactly onto another."""
  trainer, model, items = setup["trainer"], setup["model"], setup["items"]
  state, _ = trainer.dpo_update(trainer.init_state(model), *items[0])
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {"index": 1}, force=True)
    ckpt.wait()
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  other_model = _sharded(
      lambda: models.VideoLlava(MODEL_CONFIG, rngs=nnx.Rngs(1)), mesh)
  other = train.Trainer(other_model, dataclasses.replace(CONFIG), mesh,
                        total_steps=30)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, data_state = ckpt.restore(other.abstract_state())
  assert data_state == {"index": 1}
  for got, want, sharding in zip(jax.tree.leaves(restored),
                                 jax.tree.leaves(state),
                                 jax.tree.leaves(other.state_shardings)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == sharding


def test_bfloat16_compute_keeps_float32_master_weights(setup):
  """A bf16-compute model trains float32 parameters and moments."""
  trainer, items = setup["trainer"], setup["items"]
  mesh = trainer.mesh
  make = lambda: models.VideoLlava(MODEL_CONFIG, rngs=nnx.Rngs(0),
                                   dtype=jnp.bfloat16, param_dtype=jnp.float32)
  model = _sharded(make, mesh)
  bf16_trainer = train.Trainer(model, CONFIG, mesh, total_steps=30)
  state, metrics = bf16_trainer.dpo_update(bf16_trainer.init_state(model),
                                           *items[0])
  _, expected = trainer.dpo_update(trainer.init_state(setup["model"]),
                                   *items[0])
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
          if x.ndim} == {np.dtype(np.float32)}
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=2e-2)
  np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"],
                             rtol=5e-2)
