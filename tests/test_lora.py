"""LoRA (lora.py, train.Trainer with TrainConfig.lora) against peft's LoRA.

The torch side is a tiny random transformers VideoLlava with peft's adapters
on the same kernels, holding the same A and B (copied across, transposed:
torch's Linear is [out, in], our kernels [in, out]). B is drawn nonzero for
the comparisons, so that the low-rank paths and both gradients count.
End to end: a LoRA iteration of configs/smoke.py and a LoRA `isr-dpo sft`.
"""
import dataclasses
import re

import hf_reference as ref
import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import tolerance
import torch
import transformers
from flax import nnx

from isr_dpo_jax import checkpoint, iterate, lora, models, parallel, settings, sft, train
from isr_dpo_jax.data import batching

LORA = settings.LoraConfig(rank=4, alpha=8.0)
CONFIG = train.TrainConfig(learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.1,
                           max_grad_norm=1.0, lora=LORA)
PROMPT_LENGTHS = [7, 4, 6, 3]
TARGET_LENGTHS = [5, 2, 6, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny transformers VideoLlava, its path, and adapters with B nonzero."""
  hf = ref.tiny_model(seed=0)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  model = models.load_pretrained(path)
  params = nnx.to_pure_dict(nnx.state(model))
  adapters = lora.init(params, LORA, jax.random.key(0))
  rng = np.random.default_rng(0)
  adapters = jax.tree_util.tree_map_with_path(  # host copies: steps donate theirs
      lambda p, x: np.asarray(x) if p[-1].key == "lora_a" else
      rng.normal(0, 0.2, x.shape).astype(np.float32), adapters)
  ids, mask = ref.video_prompts(PROMPT_LENGTHS, model.config.num_video_tokens)
  return dict(hf=hf, path=path, model=model, params=params, adapters=adapters,
              ids=ids, mask=mask, frames=ref.videos(len(PROMPT_LENGTHS)))


def _peft_model(setup, adapters):
  """A fresh copy of the transformers model with peft adapters = `adapters`."""
  modules = lora.targets(setup["params"], LORA.targets)
  names = ["model." + ".".join(map(str, m)) for m in modules]
  hf = ref.tiny_model(seed=0)
  model = peft.get_peft_model(hf, peft.LoraConfig(
      r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=names))
  with torch.no_grad():
    for module, name in zip(modules, names):
      layer = model.base_model.model.get_submodule(name)
      pair = adapters
      for key in module:
        pair = pair[key]
      layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(pair["lora_a"]).T))
      layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(pair["lora_b"]).T))
  return model


def _peft_adapters(model, modules) -> dict:
  """The peft model's (A, B) per module path, in our [in, r], [r, out] layout."""
  out = {}
  for module in modules:
    layer = model.base_model.model.get_submodule("model." + ".".join(map(str, module)))
    out[module] = (layer.lora_A["default"].weight.detach().numpy().T,
                   layer.lora_B["default"].weight.detach().numpy().T)
  return out


@nnx.jit
def _forward(model, ids, frames, mask):
  return model(ids, videos=frames, attention_mask=mask)


def _logits(setup, model):
  return np.asarray(_forward(model, setup["ids"], setup["frames"], setup["mask"]))


def _adapted(setup, adapters):
  model = nnx.merge(nnx.graphdef(setup["model"]), setup["params"])
  return lora.attach(model, adapters, LORA.scale)


def test_default_targets_are_the_llm_projections(setup):
  modules = lora.targets(setup["params"], LORA.targets)
  names = {"/".join(map(str, m[-2:])) for m in modules}
  assert names == {f"self_attn/{p}_proj" for p in "qkvo"} | {
      f"mlp/{p}_proj" for p in ("gate", "up", "down")}
  assert len(modules) == 7 * ref.tiny_config().text_config.num_hidden_layers
  assert all(m[0] == "language_model" for m in modules)
  with pytest.raises(ValueError, match="'q_projection' matches no 2-D kernel"):
    lora.targets(setup["params"], ["q_projection"])


def test_fresh_adapters_leave_the_model_as_it_was(setup):
  adapters = lora.init(setup["params"], LORA, jax.random.key(1))
  for module in lora.targets(setup["params"], LORA.targets):
    pair = adapters
    for key in module:
      pair = pair[key]
    fan_in = pair["lora_a"].shape[0]
    assert np.abs(pair["lora_a"]).max() <= fan_in ** -0.5
    assert pair["lora_a"].std() > 0.4 * fan_in ** -0.5  # U(-b, b): std b / sqrt(3)
    assert not np.any(pair["lora_b"])
  tolerance.assert_close(_logits(setup, _adapted(setup, adapters)),
                         _logits(setup, setup["model"]))


def test_adapter_forward_matches_peft(setup):
  expected = ref.logits(_peft_model(setup, setup["adapters"]), setup["ids"],
                        setup["mask"], setup["frames"])
  got = _logits(setup, _adapted(setup, setup["adapters"]))
  real = setup["mask"].astype(bool)
  base = _logits(setup, setup["model"])
  # The adapters matter: without them the logits part by a share of their scale.
  assert np.abs(base[real] - expected[real]).max() > 1e-2 * np.abs(expected[real]).max()
  tolerance.assert_close(got[real], expected[real])


def test_merged_forward_equals_adapter_forward(setup):
  merged = lora.merge(setup["params"], setup["adapters"], LORA.scale)
  model = nnx.merge(nnx.graphdef(setup["model"]), merged)
  np.testing.assert_array_equal(  # only the targeted kernels change
      [train.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0]],
      [train.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
          setup["params"])[0]])
  adapted = _logits(setup, _adapted(setup, setup["adapters"]))
  tolerance.assert_close(_logits(setup, model), adapted)


def _sft_batch(num_video_tokens):
  """Prompts with video and right-padded targets; the first target is not learned."""
  prompt_ids, prompt_mask = ref.video_prompts(PROMPT_LENGTHS, num_video_tokens)
  rng = np.random.default_rng(1)
  target_ids = np.zeros((len(TARGET_LENGTHS), max(TARGET_LENGTHS)), np.int32)
  for row, n in enumerate(TARGET_LENGTHS):
    target_ids[row, :n] = rng.integers(3, ref.IMAGE_ID, n)
  target_mask = target_ids > 0
  loss_mask = target_mask.copy()
  loss_mask[:, 0] = False
  return batching.SftBatch(prompt_ids.astype(np.int32), prompt_mask.astype(bool),
                           target_ids, target_mask, loss_mask)


def _peft_sft_step(model, batch, frames, config):
  """Token-mean cross-entropy, clipping and torch AdamW on the adapters."""
  ids = np.concatenate([batch.prompt_ids, batch.target_ids], axis=1).astype(np.int64)
  mask = np.concatenate([batch.prompt_mask, batch.target_mask], axis=1)
  labels = np.where(np.concatenate([np.zeros_like(batch.prompt_mask), batch.loss_mask],
                                   axis=1), ids, -100)
  model.train()
  loss = model(input_ids=torch.from_numpy(ids),
               attention_mask=torch.from_numpy(mask.astype(np.int64)),
               position_ids=torch.from_numpy(ref.positions(mask)),
               pixel_values_videos=torch.from_numpy(frames).permute(0, 1, 4, 2, 3),
               labels=torch.from_numpy(labels)).loss
  loss.backward()
  trained = [p for p in model.parameters() if p.requires_grad]
  torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
  torch.optim.AdamW(trained, lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
                    eps=config.adam_eps, weight_decay=config.weight_decay).step()
  model.eval()
  return loss.item()


def _single_device_trainer(setup, config=CONFIG):
  mesh = parallel.make_mesh({}, devices=jax.devices()[:1])
  model = models.load_pretrained(setup["path"], mesh=mesh)
  return train.Trainer(model, config, mesh, total_steps=10), model


def _with_adapters(trainer, state, adapters):
  return state.replace(params=jax.device_put(adapters, trainer.state_shardings.params))


def test_sft_step_matches_peft_with_adamw(setup):
  """One LoRA SFT update: the loss, the updated adapters, the logits after."""
  trainer, model = _single_device_trainer(setup)
  batch = _sft_batch(model.config.num_video_tokens)
  state = _with_adapters(trainer, trainer.init_state(model), setup["adapters"])
  state, metrics = trainer.sft_update(state, batch, setup["frames"])

  peft_model = _peft_model(setup, setup["adapters"])
  expected_loss = _peft_sft_step(peft_model, batch, setup["frames"], CONFIG)
  np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
  assert float(metrics["grad_norm"]) > CONFIG.max_grad_norm  # clipping on

  modules = lora.targets(setup["params"], LORA.targets)
  expected = _peft_adapters(peft_model, modules)
  before = _peft_adapters(_peft_model(setup, setup["adapters"]), modules)
  for module in modules:
    pair = jax.device_get(state.params)
    for key in module:
      pair = pair[key]
    for got, want, old in zip((pair["lora_a"], pair["lora_b"]), expected[module],
                              before[module]):
      # Adam's first step moves each entry by about lr: compare the moves.
      tolerance.assert_adam_weights_close(
          {str(module): got - old}, {str(module): want - old},
          learning_rate=CONFIG.learning_rate)
  got = _logits(setup, _adapted(setup, jax.device_get(state.params)))
  want = ref.logits(peft_model, setup["ids"], setup["mask"], setup["frames"])
  real = setup["mask"].astype(bool)
  tolerance.assert_close(got[real], want[real])


def test_dpo_update_trains_and_stores_only_the_adapters(setup):
  trainer, model = _single_device_trainer(setup)
  before = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  adapters = lora.init(before, LORA, jax.random.key(0))
  state = trainer.init_state(model)
  leaves = lambda tree: [(train.path_name(p), x.shape) for p, x in
                         jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert leaves(state.params) == leaves(adapters)
  assert leaves(trainer.abstract_state().params) == leaves(adapters)  # checkpoints
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
  opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert opt_size == 2 * adapter_size  # Adam's two moments, nothing else

  batch = _sft_batch(model.config.num_video_tokens)
  rejected = batch.target_ids[::-1].copy()
  pairs = batching.PreferenceBatch(batch.prompt_ids, batch.prompt_mask,
                                   batch.target_ids, batch.target_mask,
                                   rejected, rejected > 0)
  reference = trainer.reference_logps(before, pairs, setup["frames"])
  state, metrics = trainer.dpo_update(state, pairs, setup["frames"], *reference)
  # B starts at 0, so the first gradient reaches B alone (A only decays).
  for path, b in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]:
    if path[-1].key == "lora_b":
      assert np.abs(b).min() > 0, train.path_name(path)
  jax.tree.map(np.testing.assert_array_equal,  # the base is left as it was
               jax.device_get(nnx.to_pure_dict(nnx.state(model))), before)

  merged = jax.device_get(trainer.model_params(state))
  expected = lora.merge(before, jax.device_get(state.params), LORA.scale)
  tolerance.assert_trees_close(merged, expected)


def test_sharded_lora_step_equals_single_device(setup):
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  model = models.load_pretrained(setup["path"], mesh=mesh)
  config = dataclasses.replace(CONFIG, grad_accum_steps=2)
  trainer = train.Trainer(model, config, mesh, total_steps=10)
  q_proj = trainer.state_shardings.params["language_model"]["layers"][0]["self_attn"][
      "q_proj"]
  assert q_proj["lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q_proj["lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor")
  batch = _sft_batch(model.config.num_video_tokens)
  state, metrics = trainer.sft_update(
      _with_adapters(trainer, trainer.init_state(model), setup["adapters"]),
      batch, setup["frames"])
  single, single_model = _single_device_trainer(setup)
  expected_state, expected = single.sft_update(
      _with_adapters(single, single.init_state(single_model), setup["adapters"]),
      batch, setup["frames"])
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
  tolerance.assert_adam_weights_close(
      jax.device_get(state.params), jax.device_get(expected_state.params),
      learning_rate=CONFIG.learning_rate)


def test_lora_iteration_end_to_end(tmp_path, load_config):
  """configs/smoke.py with LoRA: one iteration, then its checkpoint and policy."""
  config = load_config("smoke", **{"iterations": 1, "train.lora.rank": 4,
                                   "train.lora.alpha": 8.0})
  iterate.run(config, tmp_path)
  it_dir = tmp_path / "iter_0"

  # The checkpoint: the adapters and their Adam moments; no weight of the model.
  steps = sorted((it_dir / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
  tree = ocp.StandardCheckpointer().metadata(steps[-1] / "state").item_metadata.tree
  stored = [(train.path_name(p), x.shape) for p, x in
            jax.tree_util.tree_flatten_with_path(tree)[0]]
  arrays = {name for name, shape in stored if shape and not name.startswith("rng")}
  assert arrays and all(name.endswith(("/lora_a", "/lora_b")) for name in arrays)

  # The policy: a plain model that differs from pi_0 in the targeted kernels alone.
  model = models.load_pretrained(tmp_path / "init")
  before = nnx.to_pure_dict(nnx.state(model))
  checkpoint.load_params(model, it_dir / "policy")
  after = nnx.to_pure_dict(nnx.state(model))
  targeted = re.compile("|".join(config.train.lora.targets))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after)[0],
                          jax.tree.leaves(before)):
    name = train.path_name(path)
    assert bool(np.any(np.asarray(a) != np.asarray(b))) == bool(targeted.search(name)), name
  assert len(arrays) == 3 * 2 * len(lora.targets(after, config.train.lora.targets))

  # ... which transformers loads once written in the Hugging Face layout.
  models.save_pretrained(model, tmp_path / "hf")
  hf = transformers.VideoLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
  q_proj = after["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(
      hf.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy(),
      np.asarray(q_proj).T)


@pytest.mark.parametrize("kwargs", [dict(rank=-1), dict(alpha=0.0),
                                    dict(rank=4, targets=())])
def test_config_rejects_what_cannot_train(kwargs):
  with pytest.raises(ValueError, match="LoRA needs"):
    settings.LoraConfig(**kwargs)


def test_lora_steps_compile_from_abstract_shapes(setup):
  """As a plan compiles them: no weights, the model built by nnx.eval_shape."""
  cfg = setup["model"].config
  model = nnx.eval_shape(lambda: models.VideoLlava(cfg, rngs=nnx.Rngs(0)))
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  trainer = train.Trainer(model, CONFIG, mesh, total_steps=10)
  state = trainer.abstract_state()
  rows = lambda *shape, dtype=np.int32: jax.ShapeDtypeStruct(shape, dtype)
  prompt_len = cfg.num_video_tokens + 8
  pairs = batching.PreferenceBatch(rows(8, prompt_len), rows(8, prompt_len, dtype=bool),
                                   rows(8, 6), rows(8, 6, dtype=bool),
                                   rows(8, 6), rows(8, 6, dtype=bool))
  frames = rows(8, ref.NUM_FRAMES, ref.IMAGE_SIZE, ref.IMAGE_SIZE, 3, dtype=np.uint8)
  feats = jax.eval_shape(trainer.encode_video, trainer.base, frames)
  reference = (rows(8, dtype=np.float32),) * 2
  step = trainer.dpo_step.lower(state, pairs, feats, *reference, trainer.base).compile()
  merge = trainer.merge_adapters.lower(trainer.base, state.params).compile()
  shapes = lambda tree: [(train.path_name(p), x.shape) for p, x in
                         jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert shapes(step.out_info[0]) == shapes(state)  # the base is not in the state
  assert shapes(merge.out_info) == shapes(trainer.base)  # a plain model


def test_lora_sft_saves_a_plain_merged_model(tmp_path, load_config):
  config = load_config("smoke", **{"world.num_videos.train": 2,  # 5 steps
                                   "sft.warmup_ratio": 0.0, "train.lora.rank": 4})
  out = sft.run(config, tmp_path)
  before = nnx.to_pure_dict(nnx.state(models.load_pretrained(tmp_path / "init")))
  after = nnx.to_pure_dict(nnx.state(models.load_pretrained(out)))
  targeted = re.compile("|".join(config.train.lora.targets))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after)[0],
                          jax.tree.leaves(before)):
    name = train.path_name(path)
    assert bool(np.any(np.asarray(a) != np.asarray(b))) == bool(targeted.search(name)), name
  transformers.VideoLlavaForConditionalGeneration.from_pretrained(out)
