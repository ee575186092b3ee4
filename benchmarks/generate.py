"""Generation speed: this engine vs transformers' `generate`, same checkpoint.

A ~50M-parameter Video-LLaVA (LLaMA hidden 512 x 8 layers, vocab 32000; a
4-layer CLIP tower on 8 frames of 112 px) is saved once with transformers'
save_pretrained, then loaded by both sides: transformers
VideoLlavaForConditionalGeneration (KV cache on) and models.load_pretrained.
Both sample (temperature 1, top-p 0.95) 64 new tokens, exactly (eos is
ignored: min_new_tokens for transformers, no stop ids here), for a batch of
16 prompts of 300 tokens (136 of them video). torch uses as many threads as
there are cores; XLA's CPU client uses all cores by default.

Model FLOPs count the work the task needs (the tower up to the selected
layer, the projector, the prompt once, the output head at the last prompt
position and at each new token, causal attention as half of a square); each
side's utilisation divides them by its time and by its own float32 (or
--dtype) matmul rate, measured here on a 2048^3 product.

  python benchmarks/generate.py                                  # CPU, float32
  python benchmarks/generate.py --samples-per-prompt 2           # 8 prompts x 2
  python benchmarks/generate.py --device cuda --dtype bfloat16   # GPU

The roofline is measured in the same run: the prefill's FLOPs at XLA's
matmul rate, plus the bytes decoding must read (weights and output head each
step, a prompt's keys once for its samples, each row's own keys) at the
bandwidth of a 512 MiB read; roofline_fraction=<roofline s / our s> (hf
generate's beside it) says how close each side comes to what the machine
allows. The last line printed is speedup_vs_hf_generate=<hf seconds / our
seconds>.

Measured 2026-12-04 at 23bbdfd on the 2-core VM (XLA's matmul 182-211
GFLOP/s against ~360 idle), three rounds: 3.44 s against 7.19 s for
transformers (2.09x, median), 57% of the roofline (53-57%); every round is in
docs/2026-12-04-top-p-and-last-layer.md. An H200 run in bf16 (0.049 s against
0.617 s, 12.5x) predates the shared prompt cache and is not rerun.

Where the CPU time goes (16 prompts): the prefill is ~1.8 s for 270 GFLOP
(150 GFLOP/s, 70-80% of the 2048^3 rate). Each decode step takes ~26 ms
against a byte roofline of ~10.6 ms, nearly all of it in the matrix
libraries: at 16 rows XLA:CPU's products (the layers and the 65 MB output
head) are bound by their arithmetic, not by the bytes they read, and the
attention over the prompt's keys reads them at about 12 GB/s. With n samples
per prompt the prompt's keys are read once per step for all n (see
models.KVCache).
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from isr_dpo_jax import models
from isr_dpo_jax import sampling

VOCAB = 32000
VIDEO_ID = VOCAB - 1


def hf_config() -> transformers.VideoLlavaConfig:
  text = dict(model_type="llama", hidden_size=512, intermediate_size=1376,
              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
              vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              max_position_embeddings=2048)
  vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, image_size=112, patch_size=28)
  return transformers.VideoLlavaConfig(
      text_config=text, vision_config=vision, image_token_index=VOCAB - 2,
      video_token_index=VIDEO_ID)


def inputs(batch: int, prompt_len: int, cfg: models.VideoLlavaConfig, seed=0):
  """Prompts [B, L] (text, the video placeholders, text) and videos."""
  rng = np.random.default_rng(seed)
  n_video = cfg.num_video_tokens
  text = rng.integers(3, VOCAB - 2, (batch, prompt_len - n_video), np.int32)
  ids = np.concatenate([text[:, :40], np.full((batch, n_video), VIDEO_ID, np.int32),
                        text[:, 40:]], axis=1)
  v = cfg.vision
  videos = rng.standard_normal((batch, v.num_frames, v.image_size, v.image_size, 3),
                               np.float32)
  return ids, np.ones_like(ids, bool), videos


def _layer_params(t) -> int:
  """Matmul weights of one decoder layer."""
  d, hd = t.hidden_size, t.resolved_head_dim
  return (d * (t.num_heads + 2 * t.num_kv_heads) * hd + t.num_heads * hd * d
          + 3 * d * t.intermediate_size)


def prefill_flops(cfg: models.VideoLlavaConfig, prompts, prompt_len) -> float:
  """Matmul FLOPs (2 per multiply-add) of reading the prompts once: the tower
  up to the selected layer, the projector, causal attention as half of a
  square, and the output head at each prompt's last position."""
  t, v = cfg.text, cfg.vision
  d, width = t.hidden_size, t.num_heads * t.resolved_head_dim
  attn = lambda q, k, w: 2 * 2 * q * k * w  # scores and values
  prefill = t.num_layers * (prompt_len * 2 * _layer_params(t)
                            + attn(prompt_len, prompt_len / 2, width))
  tokens = cfg.tokens_per_frame
  tower = v.num_frames * cfg.num_tower_layers * (
      tokens * (8 * v.hidden_size ** 2 + 4 * v.hidden_size * v.intermediate_size)
      + attn(tokens, tokens, v.hidden_size))
  tower += v.num_frames * v.num_patches * 2 * 3 * v.patch_size ** 2 * v.hidden_size
  projector = cfg.num_video_tokens * 2 * (v.hidden_size * d + d * d)
  return prompts * (tower + projector + prefill + 2 * d * t.vocab_size)


def decode_flops(cfg: models.VideoLlavaConfig, rows, prompt_len, new_tokens) -> float:
  """Matmul FLOPs of feeding each row's first new_tokens - 1 tokens back."""
  t = cfg.text
  width = t.num_heads * t.resolved_head_dim
  return rows * sum(
      t.num_layers * (2 * _layer_params(t) + 2 * 2 * (prompt_len + 1 + i) * width)
      + 2 * t.hidden_size * t.vocab_size for i in range(new_tokens - 1))


def decode_bytes(cfg: models.VideoLlavaConfig, prompts, samples, prompt_len,
                 new_tokens, itemsize) -> float:
  """Bytes the decode steps must read: each step the layers' weights and the
  output head once, each prompt's keys and values once for its samples, and
  each row's own keys and values so far."""
  t = cfg.text
  weights = t.num_layers * _layer_params(t) + t.hidden_size * t.vocab_size
  kv_per_token = t.num_layers * 2 * t.num_kv_heads * t.resolved_head_dim
  return itemsize * sum(
      weights + kv_per_token * (prompts * prompt_len + prompts * samples * (i + 1))
      for i in range(new_tokens - 1))


def best_times(fns, repeats: int) -> list[float]:
  """Each function's fastest of `repeats` runs, the runs interleaved, so that
  load from other processes on a shared machine hits both sides alike."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, runs in zip(fns, times):
      start = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - start)
  return [min(runs) for runs in times]


def matmul_rate(framework: str, device: str, dtype: str, n=2048, repeats=5) -> float:
  """FLOP/s of an n^3 matmul in `framework` (the utilisation denominator)."""
  if framework == "xla":
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    seconds, = best_times([lambda: f(a).block_until_ready()], repeats)
  else:
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    seconds, = best_times([lambda: (a @ a, sync())], repeats)
  return 2 * n ** 3 / seconds


def memory_bandwidth(dtype: str, mib=512, repeats=5) -> float:
  """Bytes/s XLA reads a `mib` MiB array at (a sum over it)."""
  a = jnp.ones((mib * 2 ** 20 // jnp.dtype(dtype).itemsize,), dtype)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  f(a).block_until_ready()
  seconds, = best_times([lambda: f(a).block_until_ready()], repeats)
  return a.nbytes / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=16, help="sequences generated")
  parser.add_argument("--samples-per-prompt", type=int, default=1,
                      help="n > 1: batch / n prompts, n samples each (one prefill "
                      "per prompt here, num_return_sequences=n for transformers)")
  parser.add_argument("--prompt-len", type=int, default=300)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch_dtype = getattr(torch, args.dtype)

  with tempfile.TemporaryDirectory() as ckpt:
    torch.manual_seed(0)
    transformers.VideoLlavaForConditionalGeneration(hf_config()).save_pretrained(ckpt)
    hf = transformers.VideoLlavaForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch_dtype).to(args.device).eval()
    model = models.load_pretrained(ckpt, dtype=getattr(jnp, args.dtype))
  cfg = model.config
  n_params = sum(p.numel() for p in hf.parameters())
  print(f"model: {n_params / 1e6:.1f}M parameters (transformers' count, image "
        f"tower included); {cfg.num_video_tokens} video tokens per prompt; "
        f"backend {jax.default_backend()}, torch on {args.device} with "
        f"{torch.get_num_threads()} threads, {args.dtype}")
  n = args.samples_per_prompt
  prompts = args.batch // n
  ids, mask, videos = inputs(prompts, args.prompt_len, cfg)
  uids = np.arange(prompts, dtype=np.int32)
  params = sampling.SamplingParams(temperature=1.0, top_p=0.95,
                                   max_new_tokens=args.new_tokens)
  sampler = sampling.Sampler(model)

  def ours():
    out = sampler(ids, mask, videos, uids, params, num_samples=n)
    assert (out.lengths == args.new_tokens).all()

  pixels = torch.from_numpy(videos).permute(0, 1, 4, 2, 3).to(args.device, torch_dtype)
  hf_inputs = dict(input_ids=torch.from_numpy(ids).long().to(args.device),
                   attention_mask=torch.from_numpy(mask).long().to(args.device),
                   pixel_values_videos=pixels)

  @torch.inference_mode()
  def theirs():
    out = hf.generate(**hf_inputs, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      num_return_sequences=n, use_cache=True, pad_token_id=0)
    assert out.shape == (args.batch, args.prompt_len + args.new_tokens)
    out.cpu()

  start = time.perf_counter()
  ours()
  print(f"ours: first call (compiles) {time.perf_counter() - start:.1f} s")
  theirs()
  our_s, hf_s = best_times([ours, theirs], args.repeats)

  prefill = prefill_flops(cfg, prompts, args.prompt_len)
  flops = prefill + decode_flops(cfg, args.batch, args.prompt_len, args.new_tokens)
  xla_rate = matmul_rate("xla", args.device, args.dtype)
  torch_rate = matmul_rate("torch", args.device, args.dtype)
  bandwidth = memory_bandwidth(args.dtype)
  read = decode_bytes(cfg, prompts, n, args.prompt_len, args.new_tokens,
                      jnp.dtype(args.dtype).itemsize)
  roofline_s = prefill / xla_rate + read / bandwidth
  tokens = args.batch * args.new_tokens
  print(f"model FLOPs per call: {flops / 1e9:.1f} GFLOP; matmul {args.dtype} "
        f"2048^3: XLA {xla_rate / 1e9:.0f} GFLOP/s, torch {torch_rate / 1e9:.0f} GFLOP/s")
  print(f"roofline: prefill {prefill / 1e9:.1f} GFLOP at the XLA matmul rate "
        f"{prefill / xla_rate:.3f} s + decode {read / 1e9:.2f} GB at "
        f"{bandwidth / 1e9:.1f} GB/s (a 512 MiB read) {read / bandwidth:.3f} s "
        f"= {roofline_s:.3f} s")
  for name, seconds, rate in (("isr_dpo_jax", our_s, xla_rate),
                              ("hf generate", hf_s, torch_rate)):
    print(f"{name:12s} {seconds:7.3f} s  {tokens / seconds:8.1f} tokens/s  "
          f"MFU {flops / seconds / rate:6.1%}")
  print(f"roofline_fraction={roofline_s / our_s:.2f} (hf generate "
        f"{roofline_s / hf_s:.2f})")
  print(f"speedup_vs_hf_generate={hf_s / our_s:.2f}")


if __name__ == "__main__":
  main()
