"""Checkpoint save/restore: exact, async, resumable, onto another mesh shape,
past a damaged step; a policy's parameters saved once and restored exactly."""
import gc
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from isr_dpo_jax import checkpoint
from isr_dpo_jax import errors
from isr_dpo_jax import train


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _state(mesh):
  """A train-state-like pytree: sharded params, masked AdamW state, rng, step."""
  rng = np.random.default_rng(0)
  params = {
      "llm": {"w": rng.normal(size=(16, 8)).astype(np.float32),
              "norm": rng.normal(size=(8,)).astype(np.float32)},
      "tower": {"w": rng.normal(size=(4, 8)).astype(np.float32)},
  }
  specs = {"llm": {"w": P("fsdp", "tensor"), "norm": P()},
           "tower": {"w": P(None, "tensor")}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(params, shardings)
  tx = optax.multi_transform(
      {"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
      {"llm": {"w": "train", "norm": "train"}, "tower": {"w": "frozen"}})
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments
  state = {"params": params, "opt_state": opt_state,
           "step": jnp.asarray(3, jnp.int32),
           "rng": jax.random.key_data(jax.random.key(7))}
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding)
      else jax.device_put(x, replicated), state)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _target_on(state, mesh):
  """Abstract restore target: same shapes, shardings re-made on `mesh`."""
  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, x.sharding.spec), state)
  return checkpoint.abstract_like(state, shardings)


def test_save_restore_exact_with_data_state(tmp_path):
  mesh = _mesh((1, 4, 2))
  state = _state(mesh)
  data_state = {"next_index": 12, "seed": 3, "note": "grain state"}
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.save(3, state, data_state)
    ckpt.wait()
    restored, restored_data = ckpt.restore(_target_on(state, mesh))
  _assert_trees_equal(restored, state)
  assert restored_data == data_state
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert x.sharding == y.sharding


@pytest.mark.parametrize("new_shape", [(2, 2, 2), (1, 1, 1)])
def test_restore_onto_another_mesh_shape(tmp_path, new_shape):
  state = _state(_mesh((1, 4, 2)))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, state, force=True)
    ckpt.wait()
  new_mesh = _mesh(new_shape) if new_shape != (1, 1, 1) else jax.make_mesh(
      new_shape, ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, data_state = ckpt.restore(_target_on(state, new_mesh))
  assert data_state == {}
  _assert_trees_equal(restored, state)
  w = restored["params"]["llm"]["w"]
  assert w.sharding.mesh.shape == new_mesh.shape
  assert w.sharding.spec == P("fsdp", "tensor")


def test_resume_takes_latest_step_on_interval(tmp_path):
  state = _state(_mesh((1, 4, 2)))
  directory = tmp_path / "checkpoints"
  with checkpoint.Checkpointer(directory, save_interval_steps=2,
                               max_to_keep=2) as ckpt:
    saved = [ckpt.save(s, state, {"step": s}) for s in range(1, 6)]
    ckpt.wait()
  assert saved == [True, True, False, True, False]  # first, then every 2nd
  # A fresh manager (the resumed run) sees the last finished step.
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 4
    _, data_state = ckpt.restore(_target_on(state, _mesh((1, 4, 2))))
  assert data_state == {"step": 4}


def test_policy_params_restore_exactly_onto_the_model_and_save_once(tmp_path):
  """pi_{t+1}'s parameters: restored onto the shardings the model has; a
  second save to the same place (a resumed iteration) keeps the first."""
  params = nnx.to_pure_dict(nnx.state(nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
  checkpoint.save_params(params, tmp_path / "policy")
  checkpoint.save_params(jax.tree.map(jnp.zeros_like, params), tmp_path / "policy")

  model = nnx.Linear(8, 4, rngs=nnx.Rngs(1))
  mesh = _mesh((1, 4, 2))
  shardings = {"kernel": NamedSharding(mesh, P("fsdp", "tensor")),
               "bias": NamedSharding(mesh, P("tensor"))}
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
  nnx.update(model, state)
  checkpoint.load_params(model, tmp_path / "policy")
  restored = nnx.to_pure_dict(nnx.state(model))
  _assert_trees_equal(restored, params)
  assert {k: v.sharding for k, v in restored.items()} == shardings


def test_restore_without_checkpoint_names_directory(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="empty"):
      ckpt.restore({})


def _damage(step_dir, part):
  """Deletes `part` of a step's state: its tree metadata or its array data."""
  state_dir = step_dir / "state"
  if part == "_METADATA":
    (state_dir / "_METADATA").unlink()
  else:
    for path in (state_dir / "d").iterdir():
      path.unlink()


# A failed tensorstore read leaves a callback on Orbax's closed event loop;
# the damaged-step tests collect it themselves, where its warning is expected.
_EXPECTED_LOOP_WARNING = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _train_state_checkpoints(directory, steps):
  """A TrainState saved at `steps`, each with data state {"step": step}."""
  state = train.TrainState(**_state(_mesh((1, 4, 2))))
  with checkpoint.Checkpointer(directory, save_interval_steps=1,
                               max_to_keep=None) as ckpt:
    for step in steps:
      ckpt.save(step, state, {"step": step})
    ckpt.wait()
  return state


@_EXPECTED_LOOP_WARNING
@pytest.mark.parametrize("part", ["_METADATA", "d"])
def test_a_damaged_newest_step_is_skipped_for_the_one_before(tmp_path, part,
                                                             caplog):
  state = _train_state_checkpoints(tmp_path, steps=(1, 2, 3))
  _damage(tmp_path / "3", part)
  target = _target_on(state, _mesh((1, 4, 2)))
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, data_state = ckpt.restore(target)
    assert data_state == {"step": 2}
    _assert_trees_equal(restored, state)
    # Only our own line: tensorstore's failed reads may also surface as
    # asyncio "Future exception was never retrieved" records, whenever the
    # garbage collector gets to them.
    [record] = [r for r in caplog.records
                if r.name == "root" and r.levelno >= logging.WARNING]
    assert "step 3 does not restore" in record.getMessage()
    assert "resuming from step 2" in record.getMessage()
    assert "\n" not in record.getMessage() and len(record.getMessage()) < 400
    # The damaged step is gone: training saves step 3 again.
    assert ckpt.latest_step() == 2
    assert ckpt.save(3, state, {"step": 3}, force=True)
    ckpt.wait()
    assert ckpt.restore(target)[1] == {"step": 3}
  gc.collect()


@_EXPECTED_LOOP_WARNING
def test_no_step_restoring_is_one_line_user_error(tmp_path):
  state = _train_state_checkpoints(tmp_path, steps=(1, 2))
  _damage(tmp_path / "1", "d")
  _damage(tmp_path / "2", "_METADATA")
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpt.restore(_target_on(state, _mesh((1, 4, 2))))
  message = str(error.value)
  assert isinstance(error.value, errors.UserError)
  assert "\n" not in message and str(tmp_path) in message
  assert "step 2 does not restore" in message and "step 1 does not restore" in message
  gc.collect()
