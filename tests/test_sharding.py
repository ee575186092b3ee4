"""Mesh construction, logical-axis shardings and sharded forward on 8 CPU devices."""
import hf_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from isr_dpo_jax import models
from isr_dpo_jax import parallel


def test_make_mesh_fills_one_axis():
  mesh = parallel.make_mesh({"fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


@pytest.mark.parametrize("shape, message", [
    ({"model": 8}, "unknown mesh axes"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3}, "does not cover"),
])
def test_make_mesh_rejects_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(shape)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  ref.tiny_model(seed=5).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"fsdp": 4, "tensor": 2})


def test_loaded_parameters_follow_the_rules(checkpoint, mesh):
  model = models.load_pretrained(checkpoint, mesh=mesh)
  layer = model.language_model.layers[0]
  assert layer.self_attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert layer.mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
  assert model.language_model.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
  assert layer.input_layernorm.scale[...].sharding.spec == P(None)
  shard = layer.self_attn.q_proj.kernel[...].addressable_shards[0]
  assert shard.data.shape == (32 // 4, 32 // 2)


def test_sharded_forward_equals_unsharded(checkpoint, mesh):
  model = models.load_pretrained(checkpoint)
  sharded = models.load_pretrained(checkpoint, mesh=mesh)
  ids, mask = ref.video_prompts([6, 3, 5, 4], model.config.num_video_tokens)
  frames = ref.videos(4)
  batch = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(("data", "fsdp"))))
  forward = nnx.jit(lambda m, ids, frames, mask: m(ids, videos=frames, attention_mask=mask))
  got = forward(sharded, batch(ids), batch(frames), batch(mask))
  expected = model(jnp.asarray(ids), videos=jnp.asarray(frames), attention_mask=jnp.asarray(mask))
  assert got.sharding.mesh == mesh
  tolerance.assert_close(got, expected)
