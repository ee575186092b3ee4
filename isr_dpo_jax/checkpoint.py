"""Checkpoints in Orbax: a training run's train state, and a policy's parameters.

Training (`Checkpointer`): an Orbax CheckpointManager over one directory per
training run (the loop's `iter_<t>/checkpoints`, SFT's `<workdir>/checkpoints`),
laid out as `<directory>/<step>/{state,data}`. `state` is the train state
pytree (params, optimizer state, step, RNG) written as sharded arrays; `data` is
the input iterator's state as JSON (grain's `get_state()`), so a killed run
resumes on the exact next batch. Saves are asynchronous: `save` returns once
the arrays are copied off the devices, so the caller may donate the state to
the next step while the files are written.

Restoring takes an abstract target (`abstract_like`: `jax.ShapeDtypeStruct`s
with shardings), so a checkpoint written on one mesh loads directly onto
another. A step that does not restore (files lost to a kill, a full disk or a
hand) is deleted and the step before it restored, so a damaged checkpoint
never blocks resume.

A policy (`save_params` / `load_params`): the loop's pi_{t+1}, `iter_<t>/policy`,
is its parameters alone: one Orbax checkpoint, each process writing its own
shards, under a temporary name that Orbax renames once every shard is
written; so a killed save leaves no `policy` directory, and the resumed
iteration saves it again. (`models.save_pretrained` writes a model in the
Hugging Face layout, for transformers.)
"""
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from isr_dpo_jax import errors

PyTree = Any


class CheckpointError(errors.UserError):
  """No step of a checkpoint directory restores."""


class Checkpointer:
  """Periodic, asynchronous train-state checkpoints of one training run."""

  def __init__(self, directory: str | os.PathLike, *,
               save_interval_steps: int = 100, max_to_keep: int | None = 2,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options,
        item_names=("state", "data"))

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)

  def latest_step(self) -> int | None:
    """The last step whose checkpoint was fully written, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree,
           data_state: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves at `step` if it falls on the interval (or `force`); async."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state or {}))))

  def restore(self, abstract_state: PyTree, step: int | None = None
              ) -> tuple[PyTree, dict]:
    """Restores (state, data_state) at `step`, by default the newest that restores.

    `abstract_state` gives shapes, dtypes and the target shardings, e.g.
    `jax.eval_shape(init_fn)` with `.sharding` set for the current mesh.
    `data_state` is `{}` when none was saved. Steps newer than the one
    restored did not restore: they are deleted (so that training can save
    those steps again) and named in one logged line. CheckpointError if no
    step restores.
    """
    steps = [step] if step is not None else sorted(self._manager.all_steps(),
                                                   reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for candidate in steps:
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types (ValueError,
        # FileNotFoundError, ...) for a step whose files are gone or cut.
        failures.append((candidate, _first_line(e)))
        continue
      if failures:
        for damaged, _ in failures:
          self._manager.delete(damaged)
        logging.warning("%s: %s; deleted, resuming from step %d",
                        self.directory, _describe(failures), candidate)
      return restored["state"], restored["data"]
    raise CheckpointError(
        f"{self.directory}: no checkpoint restores ({_describe(failures)}); "
        "delete the directory to start this training from its first step")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _first_line(error: Exception, limit: int = 200) -> str:
  """'ValueError: <its first line, cut at `limit`>': Orbax's run to pages."""
  lines = str(error).strip().splitlines() or [""]
  line = lines[0] if len(lines[0]) <= limit else lines[0][:limit] + "..."
  return f"{type(error).__name__}: {line}"


def _describe(failures: list[tuple[int, str]]) -> str:
  return "; ".join(f"step {step} does not restore ({reason})"
                   for step, reason in failures)


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree` placed on `shardings` (a restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def save_params(params: dict, path: pathlib.Path) -> None:
  """A policy's parameters (a pure dict) as one Orbax checkpoint, once.

  Every process calls it; process 0's view of `path` decides for all.
  """
  if multihost_utils.broadcast_one_to_all(np.bool_(path.exists())):
    return
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.absolute(), params)
  checkpointer.wait_until_finished()


def load_params(model: nnx.Module, path: str | os.PathLike) -> None:
  """Restores `save_params` output into `model`, onto its current shardings."""
  state = nnx.state(model)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute(), abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
