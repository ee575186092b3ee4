"""A run's inputs: from the config, or made here on the synthetic video world.

Real runs start from a checkpoint directory people bring (LLaVA-Hound-SFT)
and their own jsonl files. Runs on the synthetic world (the smoke config, the
demo) make theirs (world/build.py): the world's videos and jsonl files, a
tokenizer trained on its text and a tiny random model, pi_0.
"""
import dataclasses
import os
import pathlib

import ml_collections

from isr_dpo_jax import settings
from isr_dpo_jax.world import build


@dataclasses.dataclass(frozen=True)
class Setup:
  """Where a run's inputs are."""
  init_checkpoint: pathlib.Path  # pi_0
  prompts: pathlib.Path  # QA jsonl of (video, question) prompts
  sft_data: pathlib.Path | None  # instruction jsonl for `isr-dpo sft`
  video_root: pathlib.Path
  test_sets: tuple[str, ...]  # test-QA files or registered names
  ground_truth: pathlib.Path | None = None  # the synthetic world's, if any


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Setup:
  """The run's inputs; on the synthetic world, writes the world and pi_0 first."""
  given = lambda value: pathlib.Path(value) if value else None
  if config.get("world") is None:
    return Setup(given(config.model.checkpoint), given(config.data.prompts),
                 given(config.sft.data), given(config.data.video_root),
                 tuple(config.eval.test_sets))
  world = build.write_world(config.world, config.world.get("dir") or workdir / "world")
  checkpoint = given(config.model.checkpoint) or build.init_checkpoint(
      config.world, world, workdir / "init", settings.prompts(config),
      config.model.family)
  return Setup(checkpoint, given(config.data.prompts) or world["train_qa"],
               given(config.sft.data) or world["train_sft"], world["video_root"],
               tuple(config.eval.test_sets) or (os.fspath(world["test_qa"]),),
               world["ground_truth"])
