"""Videos decoded once: `isr-dpo prepare-videos --config=... --workdir=...`.

Writes the frames of every distinct video of the run's prompts and test sets,
sampled and resized for its model, as an array_record dataset in
config.data.video_cache (data/video_cache.py). Runs with the same
data.video_cache then read those frames instead of decoding every video again
in every iteration:

  isr-dpo prepare-videos --config=c.py --workdir=w --config.data.video_cache=v
  isr-dpo iterate --config=c.py --workdir=w --config.data.video_cache=v

Process 0 writes the dataset; the others wait for it.
"""
import logging
import pathlib

import ml_collections

from isr_dpo_jax import bootstrap
from isr_dpo_jax import distributed
from isr_dpo_jax import errors
from isr_dpo_jax.data import tfds_builder
from isr_dpo_jax.data import video_cache
from isr_dpo_jax.eval import test_sets
from isr_dpo_jax.models import checkpoints


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  logging.getLogger().setLevel(logging.INFO)
  prepared = distributed.write_on_main(
      config.data.video_cache, lambda: run(config, pathlib.Path(workdir)))
  if prepared is not None:  # on process 0
    print(f"prepared {len(prepared)} videos ({len(prepared.bad)} undecodable) "
          f"in {prepared.data_dir}: runs with --config.data.video_cache="
          f"{prepared.data_dir} read them")


def run(config: ml_collections.ConfigDict,
        workdir: pathlib.Path) -> tfds_builder.Prepared:
  """The run's prompts' and test sets' videos, prepared (or found prepared)."""
  if not config.data.video_cache:
    raise errors.UserError(
        "data.video_cache is empty: set --config.data.video_cache=<folder> "
        "for the prepared videos (and the same on iterate and eval)")
  setup = bootstrap.prepare(config, workdir)
  if setup.prompts is None:
    raise errors.UserError("data.prompts is empty: set "
                           "--config.data.prompts=<qa.jsonl>")
  vision = checkpoints.read_config(setup.init_checkpoint)[0].vision
  return video_cache.prepare(
      config.data.video_cache, [setup.prompts, *_test_files(config, setup)],
      setup.video_root, vision.num_frames, vision.image_size,
      max_error_rate=config.data.max_error_rate)


def _test_files(config, setup: bootstrap.Setup) -> list[pathlib.Path]:
  try:
    return [test_sets.resolve_test_set(name, config.eval.test_root)[1]
            for name in setup.test_sets]
  except ValueError as e:  # a registered name without eval.test_root
    raise errors.UserError(str(e)) from e
