"""Checkpoint save/restore: exact, async, resumable, onto another mesh shape."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from isr_dpo_jax import checkpoint


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
  directory = checkpoint.iteration_dir(tmp_path, 2)
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


def test_restore_without_checkpoint_names_directory(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="empty"):
      ckpt.restore({})
