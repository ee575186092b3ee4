"""LanguageBind temporal attention against an independent PyTorch reference.

The reference is written from docs/method.md §4: per layer, add the temporal
embedding, then LayerNorm -> attention over the frames at each token position ->
residual; then the usual pre-LN spatial attention and MLP. The test writes a tiny
checkpoint in the original Video-LLaVA (llava_llama) layout and loads it.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import save_file

from isr_dpo_jax import models

FRAMES, SIZE, PATCH, D, HEADS, LAYERS, MLP = 4, 28, 14, 16, 2, 3, 24
TEXT = dict(vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=256)
TOWER = "model.video_tower.video_tower."


def _tower_weights(rng) -> dict[str, np.ndarray]:
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda name: {f"{name}.weight": 1 + w(D), f"{name}.bias": w(D)}
  attn = lambda name: {f"{name}.{p}_proj.{k}": w(D, D) if k == "weight" else w(D)
                       for p in ("q", "k", "v", "out") for k in ("weight", "bias")}
  tensors = {"embeddings.class_embedding": w(D),
             "embeddings.patch_embedding.weight": w(D, 3, PATCH, PATCH),
             "embeddings.position_embedding.weight": w((SIZE // PATCH) ** 2 + 1, D),
             **norm("pre_layrnorm"), **norm("post_layernorm")}
  for i in range(LAYERS):
    layer = f"encoder.layers.{i}"
    tensors.update({f"{layer}.temporal_embedding": w(1, FRAMES, D),
                    **norm(f"{layer}.temporal_layer_norm1"), **attn(f"{layer}.temporal_attn"),
                    **norm(f"{layer}.layer_norm1"), **attn(f"{layer}.self_attn"),
                    **norm(f"{layer}.layer_norm2"),
                    f"{layer}.mlp.fc1.weight": w(MLP, D), f"{layer}.mlp.fc1.bias": w(MLP),
                    f"{layer}.mlp.fc2.weight": w(D, MLP), f"{layer}.mlp.fc2.bias": w(D)})
  return {TOWER + k: v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(path, tensors, LLaMA reference) of a tiny original-layout checkpoint."""
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, initializer_range=0.2))
  rng = np.random.default_rng(0)
  tensors = {k: v.numpy() for k, v in llama.state_dict().items()}
  tensors.update(_tower_weights(rng))
  h = TEXT["hidden_size"]
  tensors.update({"model.mm_projector.0.weight": rng.standard_normal((h, D), np.float32) * 0.2,
                  "model.mm_projector.0.bias": rng.standard_normal(h, np.float32) * 0.2,
                  "model.mm_projector.2.weight": rng.standard_normal((h, h), np.float32) * 0.2,
                  "model.mm_projector.2.bias": rng.standard_normal(h, np.float32) * 0.2,
                  # The image tower is not part of a video model: ignored on load.
                  "model.image_tower.image_tower.embeddings.class_embedding":
                      np.zeros(D, np.float32)})
  path = tmp_path_factory.mktemp("original")
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  tower = {"hidden_size": D, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "image_size": SIZE, "patch_size": PATCH,
           "hidden_act": "gelu", "num_frames": FRAMES, "add_time_attn": True}
  config = {**TEXT, "model_type": "llava_llama",
            "mm_video_tower": "LanguageBind/LanguageBind_Video_merge",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": D, "video_tower_config": tower}
  (path / "config.json").write_text(json.dumps(config))
  return path, tensors, llama.eval()


def _attention(x, w, name):
  """Multi-head self-attention over axis -2 of [..., L, D], from the raw weights."""
  proj = lambda p: F.linear(x, w[f"{name}.{p}_proj.weight"], w[f"{name}.{p}_proj.bias"])
  heads = lambda t: t.unflatten(-1, (HEADS, D // HEADS)).transpose(-2, -3)
  q, k, v = heads(proj("q")), heads(proj("k")), heads(proj("v"))
  scores = (q @ k.transpose(-1, -2)) / (D // HEADS) ** 0.5
  out = (scores.softmax(-1) @ v).transpose(-2, -3).flatten(-2)
  return F.linear(out, w[f"{name}.out_proj.weight"], w[f"{name}.out_proj.bias"])


def _layer_norm(x, w, name):
  return F.layer_norm(x, (D,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)


@torch.no_grad()
def reference_features(tensors, frames_BxTxHxWx3):
  """LanguageBind tower (2 of 3 layers: feature layer -2, all tokens) + projector."""
  w = {k[len(TOWER):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(TOWER)}
  b = frames_BxTxHxWx3.shape[0]
  pixels = torch.from_numpy(frames_BxTxHxWx3).flatten(0, 1).permute(0, 3, 1, 2)
  patches = F.conv2d(pixels, w["embeddings.patch_embedding.weight"], stride=PATCH)
  x = torch.cat([w["embeddings.class_embedding"].expand(b * FRAMES, 1, D),
                 patches.flatten(2).transpose(1, 2)], dim=1)
  x = _layer_norm(x + w["embeddings.position_embedding.weight"], w, "pre_layrnorm")
  x = x.unflatten(0, (b, FRAMES))  # [B, T, L, D]
  for i in range(LAYERS - 1):
    layer = f"encoder.layers.{i}"
    x = x + w[f"{layer}.temporal_embedding"][0][None, :, None, :]
    x_time = x.transpose(1, 2)  # [B, L, T, D]: attend over frames per token position.
    x = x + _attention(_layer_norm(x_time, w, f"{layer}.temporal_layer_norm1"), w,
                       f"{layer}.temporal_attn").transpose(1, 2)
    x = x + _attention(_layer_norm(x, w, f"{layer}.layer_norm1"), w, f"{layer}.self_attn")
    h = F.linear(_layer_norm(x, w, f"{layer}.layer_norm2"), w[f"{layer}.mlp.fc1.weight"],
                 w[f"{layer}.mlp.fc1.bias"])
    x = x + F.linear(F.gelu(h), w[f"{layer}.mlp.fc2.weight"], w[f"{layer}.mlp.fc2.bias"])
  p = {k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("model.mm_projector")}
  h = F.gelu(F.linear(x.flatten(1, 2), p["model.mm_projector.0.weight"],
                      p["model.mm_projector.0.bias"]))
  return F.linear(h, p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])


@pytest.fixture(scope="module")
def model(checkpoint):
  return models.load_pretrained(checkpoint[0])


def _frames(batch, seed):
  return np.random.default_rng(seed).standard_normal((batch, FRAMES, SIZE, SIZE, 3), np.float32)


def test_original_layout_config(model):
  cfg = model.config
  assert cfg.vision.temporal_attention and cfg.vision.num_frames == FRAMES
  assert cfg.feature_strategy == "full" and cfg.num_video_tokens == FRAMES * 5
  assert cfg.video_token_id == -201
  assert len(model.video_tower.layers) == LAYERS - 1


def test_temporal_tower_features_match_reference(checkpoint, model):
  frames = _frames(2, seed=0)
  got = model.encode_video(jnp.asarray(frames))
  np.testing.assert_allclose(np.asarray(got), reference_features(checkpoint[1], frames).numpy(),
                             atol=1e-4, rtol=0)


def test_temporal_attention_mixes_frames(model):
  """Frames meet only in temporal attention: editing frame 0 changes the others."""
  frames = _frames(1, seed=1)
  edited = frames.copy()
  edited[0, 0] += 1.0
  a, b = (np.asarray(model.encode_video(jnp.asarray(f))).reshape(FRAMES, 5, -1)
          for f in (frames, edited))
  assert np.abs(a[1:] - b[1:]).max() > 1e-3


def test_original_layout_logits_match_reference(checkpoint, model):
  _, tensors, llama = checkpoint
  n = model.config.num_video_tokens
  rng = np.random.default_rng(2)
  ids = np.concatenate([rng.integers(3, 80, (2, 3)), np.full((2, n), -201),
                        rng.integers(3, 80, (2, 4))], axis=1)
  frames = _frames(2, seed=3)
  with torch.no_grad():
    embeds = llama.model.embed_tokens(torch.from_numpy(np.where(ids < 0, 0, ids)))
    embeds[torch.from_numpy(ids < 0)] = reference_features(tensors, frames).flatten(0, 1)
    expected = llama(inputs_embeds=embeds).logits.numpy()
  got = model(jnp.asarray(ids), videos=jnp.asarray(frames))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
