"""Every config builds; the 7B one abstractly (mesh, shapes, shardings, no weights)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from isr_dpo_jax import iterate
from isr_dpo_jax import models
from isr_dpo_jax import parallel
from isr_dpo_jax import train


@pytest.mark.parametrize("name", sorted(p.stem for p in conftest.CONFIGS.glob("*.py")))
def test_config_loads_and_trains_with_a_valid_recipe(name):
  config = conftest.load_config(name)
  train_config = iterate.train_config(config)
  assert train_config.loss_type in ("sigmoid", "ipo", "hinge")
  assert config.sampling.batch_size % 8 == 0  # divides the CPU test mesh


def test_video_llava_7b_builds_its_mesh_shapes_and_shardings_abstractly():
  config = conftest.load_config("video_llava_7b")
  mesh = parallel.make_mesh(dict(config.mesh))  # 8 CPU devices: fsdp 8
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  model = nnx.eval_shape(lambda: models.VideoLlava(
      models.VideoLlavaConfig(), rngs=nnx.Rngs(0),
      dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.float32))
  trainer = train.Trainer(model, iterate.train_config(config), mesh, total_steps=100)
  state = trainer.abstract_state()

  def size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))

  def bytes_per_device(tree):
    return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))

  llm = size(state.params["language_model"])
  assert 6.7e9 < llm < 6.8e9  # Vicuna-7B
  # LanguageBind ViT-L/14: 23 of 24 layers feed layer -2; each has CLIP's
  # attention, MLP and 2 LayerNorms plus temporal attention, LayerNorm and a
  # [8, 1024] temporal embedding; then patch, class and position embeddings.
  d, f = 1024, 4096
  attention = 4 * (d * d + d)
  spatial = attention + (d * f + f + f * d + d) + 2 * 2 * d
  temporal = attention + 2 * d + 8 * d
  embeddings = 14 * 14 * 3 * d + d + 257 * d + 2 * d
  assert size(state.params["video_tower"]) == 23 * (spatial + temporal) + embeddings
  # Adam moments for the LLM only: tower and projector are frozen (the
  # lineage's recipe); a few scalars (step counts) besides.
  assert 0 <= size(state.opt_state) - 2 * llm < 16
  # FSDP spreads parameters and optimizer state evenly over the 8 devices.
  total = 4 * (size(state.params) + size(state.opt_state))
  assert bytes_per_device((state.params, state.opt_state)) < 1.02 * total / 8
