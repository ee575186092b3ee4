"""The DPO/SFT update against transformers + torch, across meshes and modes.

A tiny random transformers VideoLlava is the policy (and, with another seed,
the reference); our model is loaded from its save_pretrained. The torch side
is written here from the formulas of docs/method.md §3: TRL-style rows
[prompt ; response], summed response log-probs, the sigmoid loss with label
smoothing plus gamma x chosen cross-entropy, global-norm clipping and AdamW
with weight decay on matrices only (HF Trainer's parameter groups).
"""
import dataclasses

import hf_reference as ref
import jax
import numpy as np
import pytest
import tolerance
import torch
from flax import nnx

from isr_dpo_jax import models, parallel, train
from isr_dpo_jax.data import batching

PROMPT_LENGTHS = [7, 4, 6, 3, 5, 7, 2, 6]
RESPONSE_LENGTHS = [(5, 3), (2, 6), (6, 6), (1, 4), (3, 2), (6, 1), (4, 5),
                    (2, 2)]
CONFIG = train.TrainConfig(
    learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.1, max_grad_norm=1.0,
    beta=0.5, label_smoothing=0.1, gamma=0.3)
TOTAL_STEPS = 10


def _responses(lengths, seed):
  """Right-padded responses ending in eos (2)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), max(lengths)), np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n] = np.append(rng.integers(3, ref.IMAGE_ID, n - 1), 2)
  return ids, ids > 0


def _preference_batch(num_video_tokens):
  prompt_ids, prompt_mask = ref.video_prompts(PROMPT_LENGTHS, num_video_tokens)
  chosen = _responses([c for c, _ in RESPONSE_LENGTHS], seed=1)
  rejected = _responses([r for _, r in RESPONSE_LENGTHS], seed=2)
  return batching.PreferenceBatch(prompt_ids.astype(np.int32),
                                  prompt_mask.astype(bool), *chosen, *rejected)


def _sft_batch(batch):
  """Chosen responses as targets; the first target token is not learned."""
  loss_mask = batch.chosen_mask.copy()
  loss_mask[:, 0] = False
  return batching.SftBatch(batch.prompt_ids, batch.prompt_mask,
                           batch.chosen_ids, batch.chosen_mask, loss_mask)


def _single_device_mesh():
  return parallel.make_mesh({}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Policy and reference in transformers and ours, a batch, frames."""
  policy_hf = ref.tiny_model(seed=0)
  reference_hf = ref.tiny_model(seed=1)
  paths = {}
  for name, hf in (("policy", policy_hf), ("reference", reference_hf)):
    paths[name] = tmp_path_factory.mktemp(name)
    hf.save_pretrained(paths[name])
  num_video_tokens = models.load_pretrained(paths["policy"]).config.num_video_tokens
  return dict(policy_hf=policy_hf, reference_hf=reference_hf, paths=paths,
              batch=_preference_batch(num_video_tokens),
              frames=ref.videos(len(PROMPT_LENGTHS)))


@pytest.fixture(scope="module")
def single(setup):
  """A one-device trainer and its first DPO update, with torch's numbers."""
  mesh = _single_device_mesh()
  model = models.load_pretrained(setup["paths"]["policy"], mesh=mesh)
  trainer = train.Trainer(model, CONFIG, mesh, total_steps=TOTAL_STEPS)
  reference = models.load_pretrained(setup["paths"]["reference"], mesh=mesh)
  ref_logps = trainer.reference_logps(nnx.to_pure_dict(nnx.state(reference)),
                                      setup["batch"], setup["frames"])
  state, metrics = trainer.dpo_update(trainer.init_state(model),
                                      setup["batch"], setup["frames"],
                                      *ref_logps)
  return dict(trainer=trainer, model=model, ref_logps=ref_logps,
              state=state, metrics=jax.device_get(metrics))


# -- the torch reference ----------------------------------------------------


def _torch_rows(batch, response_ids, response_mask):
  ids = np.concatenate([batch.prompt_ids, response_ids], axis=1)
  mask = np.concatenate([batch.prompt_mask, response_mask], axis=1)
  return (torch.from_numpy(ids.astype(np.int64)),
          torch.from_numpy(mask.astype(np.int64)),
          torch.from_numpy(ref.positions(mask)))


def _torch_response_logps(hf, batch, frames):
  """Summed log-probs of (chosen, rejected) and the chosen token count."""
  pixels = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)
  prompt_len = batch.prompt_ids.shape[1]
  out = []
  for ids, mask in ((batch.chosen_ids, batch.chosen_mask),
                    (batch.rejected_ids, batch.rejected_mask)):
    input_ids, attention, positions = _torch_rows(batch, ids, mask)
    logits = hf(input_ids=input_ids, attention_mask=attention,
                position_ids=positions, pixel_values_videos=pixels).logits
    logps = torch.log_softmax(logits[:, prompt_len - 1:-1], -1)
    token_logps = logps.gather(-1, torch.from_numpy(ids.astype(np.int64))[..., None])
    out.append((token_logps[..., 0] * torch.from_numpy(mask)).sum(-1))
  return out


def _torch_dpo(policy_hf, reference_hf, batch, frames, config):
  """Loss and metrics of docs/method.md §3, then one clipped AdamW step."""
  with torch.no_grad():
    ref_chosen, ref_rejected = _torch_response_logps(reference_hf, batch,
                                                     frames)
  chosen, rejected = _torch_response_logps(policy_hf, batch, frames)
  beta, eps = config.beta, config.label_smoothing
  z = (chosen - rejected) - (ref_chosen - ref_rejected)
  dpo_losses = (-torch.nn.functional.logsigmoid(beta * z) * (1 - eps)
                - torch.nn.functional.logsigmoid(-beta * z) * eps)
  sft = -chosen.sum() / batch.chosen_mask.sum()
  loss = dpo_losses.mean() + config.gamma * sft
  chosen_rewards = beta * (chosen - ref_chosen).detach()
  rejected_rewards = beta * (rejected - ref_rejected).detach()
  metrics = {
      "loss": loss.item(), "losses/dpo": dpo_losses.mean().item(),
      "losses/sft": sft.item(),
      "rewards/chosen": chosen_rewards.mean().item(),
      "rewards/rejected": rejected_rewards.mean().item(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
      "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
      "logps/chosen": chosen.mean().item(),
      "logps/rejected": rejected.mean().item(),
  }
  trained = {n: p for n, p in policy_hf.named_parameters()
             if not n.startswith(("model.video_tower", "model.image_tower",
                                  "model.multi_modal_projector"))}
  loss.backward()
  metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
      trained.values(), config.max_grad_norm).item()
  optimizer = torch.optim.AdamW(
      [{"params": [p for p in trained.values() if p.ndim > 1],
        "weight_decay": config.weight_decay},
       {"params": [p for p in trained.values() if p.ndim <= 1],
        "weight_decay": 0.0}],
      lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
      eps=config.adam_eps)
  optimizer.step()
  return (ref_chosen.numpy(), ref_rejected.numpy()), metrics


@pytest.fixture(scope="module")
def torch_step(setup, tmp_path_factory):
  """torch's numbers, and its updated policy loaded as our params."""
  policy_hf = ref.tiny_model(seed=0).train()
  ref_logps, metrics = _torch_dpo(policy_hf, setup["reference_hf"],
                                  setup["batch"], setup["frames"], CONFIG)
  path = tmp_path_factory.mktemp("updated")
  policy_hf.save_pretrained(path)
  updated = nnx.to_pure_dict(nnx.state(models.load_pretrained(path)))
  return dict(ref_logps=ref_logps, metrics=metrics, updated=updated)


# -- tests --------------------------------------------------------------------


def test_reference_logps_match_transformers(single, torch_step):
  for got, expected in zip(single["ref_logps"], torch_step["ref_logps"]):
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape,accum", [({}, 4), ({}, 8),
                                              ({"data": 2, "fsdp": 2, "tensor": 2}, 2)])
def test_microbatched_reference_logps_equal_one_pass(setup, single, mesh_shape,
                                                     accum):
  """The reference pass in the update's microbatches gives each pair the
  log-probs of the one-pass forward, in the batch's row order."""
  one_pass = single["ref_logps"]
  assert all(len(np.unique(x)) == len(x) for x in one_pass)  # a reorder shows
  devices = None if mesh_shape else jax.devices()[:1]
  mesh = parallel.make_mesh(mesh_shape, devices=devices)
  model = models.load_pretrained(setup["paths"]["policy"], mesh=mesh)
  trainer = train.Trainer(model, dataclasses.replace(CONFIG, grad_accum_steps=accum),
                          mesh, total_steps=TOTAL_STEPS)
  reference = models.load_pretrained(setup["paths"]["reference"], mesh=mesh)
  got = trainer.reference_logps(nnx.to_pure_dict(nnx.state(reference)),
                                setup["batch"], setup["frames"])
  for got_logps, want_logps in zip(got, one_pass, strict=True):
    tolerance.assert_close(got_logps, want_logps)


def test_dpo_loss_and_metrics_match_torch(single, torch_step):
  tolerance.assert_metrics_close(single["metrics"], torch_step["metrics"])
  assert single["metrics"]["grad_norm"] > CONFIG.max_grad_norm  # clipping on
  assert single["metrics"]["learning_rate"] == CONFIG.learning_rate


def test_update_matches_torch_adamw(single, torch_step):
  before = nnx.to_pure_dict(nnx.state(single["model"]))
  after = single["state"].params
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(torch_step["updated"])[0])
  for path, got in jax.tree_util.tree_flatten_with_path(after)[0]:
    name = train.path_name(path)
    tolerance.assert_adam_weights_close(
        {name: got}, {name: flat_expected[path]},
        learning_rate=CONFIG.learning_rate)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         before, after)
  for path, was_changed in jax.tree_util.tree_flatten_with_path(changed)[0]:
    name = train.path_name(path)
    frozen = name.startswith(("video_tower/", "multi_modal_projector/"))
    assert was_changed != frozen, name


def test_sft_loss_matches_transformers_labels(setup, single):
  """Our SFT loss is the token mean transformers computes from -100 labels."""
  sft = _sft_batch(setup["batch"])
  input_ids, attention, positions = _torch_rows(sft, sft.target_ids,
                                                sft.target_mask)
  labels = input_ids.clone()
  labels[:, :sft.prompt_ids.shape[1]] = -100
  labels[:, sft.prompt_ids.shape[1]:][~torch.from_numpy(sft.loss_mask)] = -100
  pixels = torch.from_numpy(setup["frames"]).permute(0, 1, 4, 2, 3)
  with torch.no_grad():
    expected = setup["policy_hf"](
        input_ids=input_ids, attention_mask=attention, position_ids=positions,
        pixel_values_videos=pixels, labels=labels).loss.item()
  trainer = single["trainer"]
  state = trainer.init_state(single["model"])
  _, metrics = trainer.sft_update(state, sft, setup["frames"])
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_accumulated_step_equals_single_device(setup, single,
                                                       mesh_shape):
  """8 devices, 2 microbatches == 1 device, 1 batch: DPO and SFT."""
  mesh = parallel.make_mesh(mesh_shape)
  model = models.load_pretrained(setup["paths"]["policy"], mesh=mesh)
  config = dataclasses.replace(CONFIG, grad_accum_steps=2)
  trainer = train.Trainer(model, config, mesh, total_steps=TOTAL_STEPS)
  state, metrics = trainer.dpo_update(trainer.init_state(model),
                                      setup["batch"], setup["frames"],
                                      *single["ref_logps"])
  assert state.params["language_model"]["embed_tokens"]["embedding"].sharding.mesh == mesh
  tolerance.assert_metrics_close(metrics, single["metrics"])
  tolerance.assert_adam_weights_close(
      jax.device_get(state.params), jax.device_get(single["state"].params),
      learning_rate=CONFIG.learning_rate)

  sft = _sft_batch(setup["batch"])
  single_trainer = single["trainer"]
  expected_state, expected = single_trainer.sft_update(
      single_trainer.init_state(single["model"]), sft, setup["frames"])
  state, metrics = trainer.sft_update(trainer.init_state(model), sft,
                                      setup["frames"])
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
  tolerance.assert_adam_weights_close(
      jax.device_get(state.params), jax.device_get(expected_state.params),
      learning_rate=CONFIG.learning_rate)


def _loss_and_grads(model, batch, feats, reference, config):
  graphdef, params = nnx.split(model)

  def loss(p):
    return train.model_dpo_loss(
        nnx.merge(graphdef, p), batch, feats, *reference, config,
        num_pairs=batch.is_real.sum(), num_chosen_tokens=batch.chosen_mask.sum())
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_packed_equals_plain_with_the_model(setup, single):
  model, trainer = single["model"], single["trainer"]
  feats = trainer.encode_video(nnx.to_pure_dict(nnx.state(model)), setup["frames"])
  results = [
      _loss_and_grads(model, setup["batch"], feats, single["ref_logps"],
                      dataclasses.replace(CONFIG, packed=packed))
      for packed in (False, True)]
  (plain_loss, plain_metrics), plain_grads = results[0]
  (packed_loss, packed_metrics), packed_grads = results[1]
  tolerance.assert_close(packed_loss, plain_loss)
  tolerance.assert_metrics_close(packed_metrics, {
      name: plain_metrics[name]
      for name in ("logps/chosen", "logps/rejected", "rewards/margins")})
  tolerance.assert_trees_close(packed_grads, plain_grads)


def test_dummy_rows_count_for_nothing(setup, single):
  """Rows that fill a short batch change neither the loss nor the gradients."""
  model, trainer = single["model"], single["trainer"]
  batch = setup["batch"]
  feats = np.asarray(trainer.encode_video(nnx.to_pure_dict(nnx.state(model)),
                                          setup["frames"]))
  real = 6
  with_dummies = jax.tree.map(lambda x: x.copy(), batch)
  for field in ("prompt_mask", "chosen_mask", "rejected_mask"):
    getattr(with_dummies, field)[real:] = False
  reference = [np.asarray(x) for x in single["ref_logps"]]
  (loss, metrics), grads = _loss_and_grads(
      model, with_dummies, feats, reference, CONFIG)
  (expected_loss, expected_metrics), expected_grads = _loss_and_grads(
      model, jax.tree.map(lambda x: x[:real], batch), feats[:real],
      [x[:real] for x in reference], CONFIG)
  tolerance.assert_close(loss, expected_loss)
  tolerance.assert_metrics_close(metrics, expected_metrics)
  tolerance.assert_trees_close(grads, expected_grads)


def test_schedules():
  linear = train.learning_rate_schedule(
      train.TrainConfig(learning_rate=1.0, warmup_ratio=0.1), total_steps=20)
  np.testing.assert_allclose([linear(s) for s in (0, 1, 2, 11, 20)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cosine = train.learning_rate_schedule(
      train.TrainConfig(learning_rate=1.0, warmup_ratio=0.0, schedule="cosine"),
      total_steps=20)
  np.testing.assert_allclose([cosine(s) for s in (0, 10, 20)],
                             [1.0, 0.5, 0.0], atol=1e-6)


def test_remat_gives_the_same_gradients(setup, single):
  model, trainer = single["model"], single["trainer"]
  feats = trainer.encode_video(nnx.to_pure_dict(nnx.state(model)), setup["frames"])
  (loss, _), grads = _loss_and_grads(model, setup["batch"], feats,
                                     single["ref_logps"], CONFIG)
  (remat_loss, _), remat_grads = _loss_and_grads(
      model, setup["batch"], feats, single["ref_logps"],
      dataclasses.replace(CONFIG, remat="nothing_saveable"))
  tolerance.assert_close(remat_loss, loss)
  tolerance.assert_trees_close(remat_grads, grads)


def test_frozen_reference_model_equals_stored_reference_logps(setup, single):
  """On-the-fly reference log-probs give the update of stored ones."""
  trainer, model = single["trainer"], single["model"]
  mesh = trainer.mesh
  reference = models.load_pretrained(setup["paths"]["reference"], mesh=mesh)
  _, metrics = trainer.dpo_update(
      trainer.init_state(model), setup["batch"], setup["frames"],
      reference_params=nnx.to_pure_dict(nnx.state(reference)))
  tolerance.assert_metrics_close(metrics, single["metrics"])


@pytest.mark.parametrize("frozen,trained", [
    (train.TrainConfig.frozen, {"language_model"}),  # DPO: the lineage's recipe
    (("video_tower",), {"language_model", "multi_modal_projector"}),  # SFT
    ((), {"language_model", "multi_modal_projector", "video_tower"}),
])
def test_an_update_trains_exactly_the_unfrozen_modules(setup, frozen, trained):
  mesh = _single_device_mesh()
  model = models.load_pretrained(setup["paths"]["policy"], mesh=mesh)
  config = dataclasses.replace(CONFIG, frozen=frozen, learning_rate=1e-3)
  trainer = train.Trainer(model, config, mesh, total_steps=TOTAL_STEPS)
  before = nnx.to_pure_dict(nnx.state(model))
  state = trainer.init_state(model)
  for _ in range(2):  # the first step of the schedule has learning rate 0
    state, _ = trainer.sft_update(state, _sft_batch(setup["batch"]), setup["frames"])
  for module in before:
    moved = [bool(np.any(np.asarray(a) != np.asarray(b))) for a, b in zip(
        jax.tree.leaves(before[module]), jax.tree.leaves(state.params[module]))]
    assert all(moved) if module in trained else not any(moved), module
