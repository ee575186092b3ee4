"""The decoder's layers as one scan (llama._scan_layers) against a plain loop.

Training and scoring run the layers as a `jax.lax.scan` over their stacked
states; the parameters stay per layer. The loss and the gradients of every
layer's parameters (or LoRA adapters, on all layers or on some) must equal
those of the layers called one after another.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance
from flax import nnx

from isr_dpo_jax import lora
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.models import llama
from isr_dpo_jax.models.config import LlamaConfig

CONFIG = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2)


def _looped_hidden_states(model: llama.Llama, x_BxLxD, positions_BxL, mask_BxL):
  """The reference: each decoder layer called in turn, then the final norm."""
  length = x_BxLxD.shape[1]
  mask_BxLxS = llama.attention_mask(mask_BxL, length, length, 0)
  cos_sin = llama.rotary_tables(positions_BxL, llama.rope_inverse_frequencies(model.config))
  for layer in model.layers:
    x_BxLxD, _ = layer(x_BxLxD, cos_sin, mask_BxLxS)
  return model.norm(x_BxLxD)


def _scanned_hidden_states(model: llama.Llama, x_BxLxD, positions_BxL, mask_BxL,
                           remat_policy=None):
  return model.hidden_states(x_BxLxD, positions_BxL, mask_BxL, remat_policy=remat_policy)[0]


def _inputs():
  rng = np.random.default_rng(0)
  ids_BxL = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 10)))
  mask_BxL = jnp.asarray(np.arange(10)[None] >= np.array([[0], [3]]))  # row 1 left-padded
  positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
  return ids_BxL, positions_BxL, mask_BxL


def _loss(model: llama.Llama, hidden_states, ids_BxL, positions_BxL, mask_BxL):
  """Mean next-token cross-entropy over the real tokens."""
  hidden_BxLxD = hidden_states(model, model.embed(ids_BxL), positions_BxL, mask_BxL)
  logps_BxLxV = jax.nn.log_softmax(model.logits(hidden_BxLxD[:, :-1]))
  token_logps = jnp.take_along_axis(logps_BxLxV, ids_BxL[:, 1:, None], axis=-1)[..., 0]
  weights = mask_BxL[:, 1:]
  return -(token_logps * weights).sum() / weights.sum()


def _model() -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(llama.Llama(CONFIG, rngs=nnx.Rngs(1)))
  return graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize("remat", [None, "nothing_saveable", "offload_layer_inputs"])
def test_scanned_layers_give_the_loops_loss_and_gradients(remat):
  graphdef, params = _model()
  scanned = lambda *args: _scanned_hidden_states(
      *args, remat_policy=train.remat_policy(remat))

  def loss_and_grads(hidden_states):
    return jax.jit(jax.value_and_grad(
        lambda p: _loss(nnx.merge(graphdef, p), hidden_states, *_inputs())))(params)

  loss, grads = loss_and_grads(scanned)
  want_loss, want_grads = loss_and_grads(_looped_hidden_states)
  tolerance.assert_close(loss, want_loss)
  tolerance.assert_trees_close(grads, want_grads)
  assert len(grads["layers"]) == CONFIG.num_layers  # per-layer parameters, as before


@pytest.mark.parametrize("targets", [
    (r"layers/\d+/self_attn/(q|v)_proj",),  # every layer adapted: one scan
    (r"layers/[02]/mlp/up_proj",),  # layers 0 and 2 only: three scans
])
def test_scanned_layers_give_the_loops_lora_gradients(targets):
  graphdef, params = _model()
  config = settings.LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapters = lora.init(params, config, jax.random.key(2))
  # B = 0 at init would leave A without gradient: start from a random B.
  adapters = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(3), x.shape) * 0.1
                       if path[-1].key == "lora_b" else x), adapters)

  def loss_and_grads(hidden_states):
    def loss(a):
      model = lora.attach(nnx.merge(graphdef, params), a, config.scale)
      return _loss(model, hidden_states, *_inputs())
    return jax.jit(jax.value_and_grad(loss))(adapters)

  loss, grads = loss_and_grads(_scanned_hidden_states)
  want_loss, want_grads = loss_and_grads(_looped_hidden_states)
  tolerance.assert_close(loss, want_loss)
  tolerance.assert_trees_close(grads, want_grads)


def test_the_layers_compile_as_one_scan():
  """One layer body in the program, run num_layers times."""
  graphdef, params = _model()
  ids_BxL, positions_BxL, mask_BxL = _inputs()
  jaxpr = jax.make_jaxpr(lambda p: _scanned_hidden_states(
      nnx.merge(graphdef, p), nnx.merge(graphdef, p).embed(ids_BxL), positions_BxL,
      mask_BxL))(params)
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert [scan.params["length"] for scan in scans] == [CONFIG.num_layers]
