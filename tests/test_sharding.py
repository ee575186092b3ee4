"""Mesh construction, logical-axis shardings and sharded forward on 8 CPU devices."""
import re

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
from isr_dpo_jax import sampling
from isr_dpo_jax import train
from isr_dpo_jax.data import batching


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


def test_shard_rows_pins_the_rows_under_a_mesh_only(mesh):
  x = jax.device_put(jnp.ones((8, 3, 6)), NamedSharding(mesh, P(None, None, "tensor")))
  assert parallel.shard_rows(x) is x  # no mesh to trace under

  def on_mesh(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return parallel.shard_rows(x * 2)

  # Rows over the batch axes (data is 1 here); the rest as it was.
  assert jax.jit(on_mesh)(x).sharding.spec == P("fsdp", None, "tensor")


def _lowered_dpo_step(model, mesh, num_pairs: int) -> jax.stages.Lowered:
  """The remat DPO update of `num_pairs` pairs (3-token responses) on `mesh`."""
  trainer = train.Trainer(model, train.TrainConfig(remat="nothing_saveable"),
                          mesh, total_steps=1)
  rows = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=trainer.batch_sharding)
  prompt = model.video.num_tokens + 4
  pairs = batching.PreferenceBatch(
      rows(num_pairs, prompt), rows(num_pairs, prompt, dtype=bool),
      *[rows(num_pairs, 3, dtype=t) for t in (jnp.int32, bool)] * 2)
  state = trainer.abstract_state()
  feats = trainer.encode_video.eval_shape(
      state.params, rows(num_pairs, *model.video.frames_shape, dtype=jnp.uint8))
  reference = rows(num_pairs, dtype=jnp.float32)
  return trainer.dpo_step.lower(state, pairs, rows(*feats.shape, dtype=feats.dtype),
                                reference, reference)


def test_training_pins_each_decoder_layers_rows(checkpoint, mesh):
  """The DPO update constrains every layer's input to the batch axes, so that
  XLA gathers FSDP's weights instead of every device's rows."""
  model = models.load_pretrained(checkpoint, mesh=mesh)
  text = _lowered_dpo_step(model, mesh, 4).as_text()
  layers = len(model.language_model.layers)
  assert len(re.findall(r'sharding_constraint [^\n]*\[\{"data", "fsdp"\}', text)) >= layers


def test_the_output_heads_backward_gathers_no_logits(checkpoint):
  """Under FSDP the head's weight gradient is reduced over the devices' rows:
  no all-gather of a [rows, tokens, vocab] logit gradient (at 7B, 1000 MiB a
  micro-batch of 16 pairs), as XLA makes when the head's rows are left free."""
  mesh = parallel.make_mesh({"fsdp": 8})
  model = models.load_pretrained(checkpoint, mesh=mesh)
  text = _lowered_dpo_step(model, mesh, 8).compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)
  assert gathered  # FSDP's weight gathers: the pattern sees all-gathers
  vocab = str(model.language_model.config.vocab_size)
  logits = [s for s in gathered if len(s.split(",")) == 3 and s.endswith(vocab)]
  assert logits == []



def test_sampling_pins_a_prefills_rows_and_frees_a_decode_steps(checkpoint):
  """The sampler traces the model under its mesh: a prefill's layers keep each
  device's own rows (left free on a v5e-16, XLA brought all 32 prompts of a 7B
  prefill to every FSDP weight shard: [32, 4104, 11008] a chip in each layer).
  A decode step's rows, a token each, stay free: pinned, XLA gathered most
  layers' weights at once (a 7B decode step at 93% of a v5e chip, 45% free)."""
  mesh = parallel.make_mesh({"fsdp": 8})
  model = models.load_pretrained(checkpoint, mesh=mesh)
  sampler = sampling.Sampler(model, mesh)
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  prompts, length, n = 8, model.video.num_tokens + 6, 2
  tokens = jax.ShapeDtypeStruct((prompts, length), jnp.int32, sharding=rows)
  videos = jax.ShapeDtypeStruct((prompts, *model.video.frames_shape), jnp.float32,
                                sharding=rows)
  prefill = sampler._prefill.trace(sampler.state, tokens, tokens, videos, num_samples=n,
                                   max_new_tokens=4)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  decode = sampler._decode.trace(
      sampler.state, *prefill.out_info, scalar, tokens.update(shape=(prompts,)), scalar,
      params=sampling.SamplingParams(max_new_tokens=4), num_samples=n)
  hidden = model.language_model.config.hidden_size
  layers = len(model.language_model.layers)
  pinned = lambda traced, layer_input: len(re.findall(
      r'sharding_constraint [^\n]*\[\{"data", "fsdp"\}[^\n]*'
      rf"tensor<{layer_input}xf32>", traced.lower().as_text()))
  assert pinned(prefill, f"{prompts}x{length}x{hidden}") == layers
  assert pinned(decode, f"{prompts * n}x1x{hidden}") == 0


def test_an_insert_moves_no_prompt_keys_between_devices(checkpoint):
  """Continuous batching puts each new prompt's keys into a slot on its own
  device. A scatter into row-sharded slots gathered every device's new keys
  to each (a v5e-16's batch of 7B prompts: 1 GiB a layer)."""
  mesh = parallel.make_mesh({"fsdp": 8})
  sampler = sampling.Sampler(models.load_pretrained(checkpoint, mesh=mesh), mesh)
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  slots, prompts, length = 16, 8, sampler.video.num_tokens + 6
  tokens = lambda b: jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=rows)
  carry = sampler._empty.trace(sampler.state, tokens(slots), tokens(slots), None,
                               num_samples=2, max_new_tokens=4).out_info
  videos = jax.ShapeDtypeStruct((prompts, *sampler.video.frames_shape), jnp.float32,
                                sharding=rows)
  per_prompt = jax.ShapeDtypeStruct((prompts,), jnp.int32, sharding=rows)
  text = sampler._insert.trace(
      sampler.state, carry, tokens(prompts), tokens(prompts), videos, per_prompt,
      jax.ShapeDtypeStruct((), jnp.int32), per_prompt,
      params=sampling.SamplingParams(max_new_tokens=4),
      num_samples=2).lower().compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)
  assert gathered  # FSDP's weight gathers: the pattern sees all-gathers
  cache = carry.cache
  prompt_keys = {",".join(map(str, (prompts, *c[0].shape[1:])))
                 for c in (cache.prefix_keys, cache.prefix_values)}
  assert not prompt_keys & set(gathered)
