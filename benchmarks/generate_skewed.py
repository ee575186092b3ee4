"""Generation at skewed output lengths: continuous batching vs the static
engine vs transformers' `generate`, same checkpoint and prompts.

The model, prompts and roofline are benchmarks/generate.py's (a ~50M
Video-LLaVA, prompts of 300 tokens, 136 of them video). What differs is the
output length: a row stops at any of `--stop-ids` ids, drawn evenly from the
vocabulary. The random model's next-token distribution is close to uniform,
so each step a row stops with probability about s / V (s stop ids, V =
32000): lengths are geometric, mean about V / s, cut at max_new_tokens. The
defaults (s = 1333: mean ~24, at most 96 tokens) are drawn like the demo's
contexts (up to 96 tokens), most short and a long tail; --max-new-tokens 256
--stop-ids 667 (mean ~48) is the loop's answers at scale (12 to 256 tokens).
The lengths measured are printed.

All three sample (temperature 1, top-p 0.95) `--prompts` prompts with
`--slots` rows at a time:
  * continuous: generate.generate, a finished prompt's slot taken by the next
    prompt, the last few moved into fewer slots (sampling.Slots);
  * static: generate.generate(static=True), batches of `--slots` prompts,
    each decoding until its longest row stops;
  * transformers: VideoLlavaForConditionalGeneration.generate on the same
    batches (KV cache on, eos_token_id = the stop ids), which also stops a
    batch when its last row does.
The prompts all have one length, so the engine runs them in one bucket of
exactly that length, as transformers does (no bucket padding on either side).
The continuous and static engines draw the same samples (the prompts' keys),
so they generate the same tokens; transformers draws its own, so tokens/s is
each side's generated tokens (stop id included) over its seconds.

The roofline is benchmarks/generate.py's, for these lengths: every prompt's
prefill at the measured XLA matmul rate, plus the bytes decoding must read at
the measured bandwidth: weights and output head once per step of a perfectly
packed batch (the tokens fed back over the slots), and each fed token's
prompt keys and own keys so far. roofline_fraction = the roofline of a
side's own lengths / its seconds.

  python benchmarks/generate_skewed.py
  python benchmarks/generate_skewed.py --device cuda --dtype bfloat16  # GPU

Measured 2026-12-04 at 23bbdfd, three rounds of each command on the 2-core
VM (XLA's matmul 188-214 GFLOP/s against ~360 idle), medians:
--max-new-tokens 256 --stop-ids 667: 1.75x the static engine and 4.08x
transformers in tokens/s (15.4, 27.6 and 72.0 s); the default: 1.61x and
2.75x. Every round is in docs/2026-12-04-top-p-and-last-layer.md. At the
default lengths the prefill is most of the roofline (5.0 of 5.9 s), so
batching gains less there than on the loop's longer answers.
"""
import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from isr_dpo_jax import generate
from isr_dpo_jax import models
from isr_dpo_jax import sampling


def _generate_benchmark():
  """benchmarks/generate.py as a module: its model, prompts and roofline."""
  path = pathlib.Path(__file__).with_name("generate.py")
  spec = importlib.util.spec_from_file_location("generate_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _generate_benchmark()


class _NoText:
  """The tokenizer `generate` asks for: a pad id; the text is not timed."""
  pad_token_id = 0

  def decode(self, ids, skip_special_tokens=True):
    del ids, skip_special_tokens
    return ""


def decode_bytes(cfg: models.VideoLlavaConfig, lengths, slots, prompt_len,
                 itemsize) -> float:
  """Bytes decoding must read for rows of `lengths` tokens: each row feeds
  back all its tokens but the last; steps of `slots` rows read the weights
  and output head once; each fed token reads its prompt's keys and values and
  its row's own so far."""
  t = cfg.text
  weights = t.num_layers * bench._layer_params(t) + t.hidden_size * t.vocab_size
  kv_per_token = t.num_layers * 2 * t.num_kv_heads * t.resolved_head_dim
  fed = np.maximum(np.asarray(lengths) - 1, 0)
  steps = fed.sum() / slots
  keys = sum(f * prompt_len + f * (f + 1) / 2 for f in fed)
  return itemsize * (steps * weights + kv_per_token * keys)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--slots", type=int, default=16,
                      help="rows decoding at once (each side's batch)")
  parser.add_argument("--prompt-len", type=int, default=300)
  parser.add_argument("--max-new-tokens", type=int, default=96)
  parser.add_argument("--stop-ids", type=int, default=1333,
                      help="s: a row stops each step with probability ~s/32000")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch_dtype = getattr(torch, args.dtype)

  with tempfile.TemporaryDirectory() as ckpt:
    torch.manual_seed(0)
    transformers.VideoLlavaForConditionalGeneration(bench.hf_config()).save_pretrained(ckpt)
    hf = transformers.VideoLlavaForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch_dtype).to(args.device).eval()
    model = models.load_pretrained(ckpt, dtype=getattr(jnp, args.dtype))
  cfg = model.config
  print(f"backend {jax.default_backend()}, torch on {args.device} with "
        f"{torch.get_num_threads()} threads, {args.dtype}; {args.prompts} prompts "
        f"of {args.prompt_len} tokens, {args.slots} rows at a time")
  ids, _, videos = bench.inputs(args.prompts, args.prompt_len, cfg)
  stops = tuple(np.linspace(3, bench.VOCAB - 3, args.stop_ids).astype(int).tolist())
  params = sampling.SamplingParams(temperature=1.0, top_p=0.95,
                                   max_new_tokens=args.max_new_tokens,
                                   stop_ids=stops)
  prompts = [generate.Prompt(row.tolist(), video, uid=i)
             for i, (row, video) in enumerate(zip(ids, videos))]
  sampler = sampling.Sampler(model)

  # Every prompt has the same length: one bucket of exactly that length, so
  # each side prefills the same tokens (transformers pads nothing either).
  bucket = args.prompt_len - cfg.num_video_tokens

  def ours(static):
    samples = [s for r in generate.generate(
        sampler, prompts, params, tokenizer=_NoText(), batch_size=args.slots,
        buckets=(bucket,), static=static, progress=False) for s in r]
    return np.array([s.length for s in samples])

  pixels = torch.from_numpy(videos).permute(0, 1, 4, 2, 3).to(args.device, torch_dtype)

  @torch.inference_mode()
  def theirs():
    lengths = []
    for first in range(0, args.prompts, args.slots):
      rows = slice(first, first + args.slots)
      out = hf.generate(
          input_ids=torch.from_numpy(ids[rows]).long().to(args.device),
          pixel_values_videos=pixels[rows], do_sample=True, temperature=1.0,
          top_p=0.95, top_k=0, max_new_tokens=args.max_new_tokens,
          eos_token_id=list(stops), pad_token_id=0, use_cache=True)
      new = out[:, args.prompt_len:].cpu().numpy()
      stopped = np.isin(new, stops)
      lengths += [int(np.argmax(s)) + 1 if s.any() else len(s) for s in stopped]
    return np.array(lengths)

  def timed(fn):
    start = time.perf_counter()
    lengths = fn()
    return time.perf_counter() - start, lengths

  for static in (False, True):  # compiles every shape the workload meets
    print(f"{'static' if static else 'continuous'}: first run (compiles) "
          f"{timed(lambda: ours(static))[0]:.1f} s")
  runs = {"continuous": timed(lambda: ours(False)),
          "static": timed(lambda: ours(True)),
          "hf generate": timed(theirs)}
  lengths = runs["continuous"][1]
  print(f"continuous and static: {(runs['static'][1] == lengths).sum()} of "
        f"{len(lengths)} samples of the same length (the same keys; float32 "
        "rounding of a different batch can move a draw)")
  for name, (_, got) in (("ours", runs["continuous"]), ("hf", runs["hf generate"])):
    print(f"output lengths ({name}): mean {got.mean():.1f}, median "
          f"{np.median(got):.0f}, p90 {np.percentile(got, 90):.0f}, max {got.max()}")

  prefill = bench.prefill_flops(cfg, args.prompts, args.prompt_len)
  xla_rate = bench.matmul_rate("xla", args.device, args.dtype)
  bandwidth = bench.memory_bandwidth(args.dtype)
  itemsize = jnp.dtype(args.dtype).itemsize
  roofline = lambda got: prefill / xla_rate + decode_bytes(
      cfg, got, args.slots, args.prompt_len, itemsize) / bandwidth
  read = decode_bytes(cfg, lengths, args.slots, args.prompt_len, itemsize)
  print(f"roofline (our lengths): prefill {prefill / 1e9:.1f} GFLOP at the XLA "
        f"matmul rate {xla_rate / 1e9:.0f} GFLOP/s {prefill / xla_rate:.3f} s + "
        f"decode {read / 1e9:.2f} GB at {bandwidth / 1e9:.1f} GB/s "
        f"{read / bandwidth:.3f} s = {roofline(lengths):.3f} s")
  rate = {}
  for name, (seconds, got) in runs.items():
    rate[name] = got.sum() / seconds
    print(f"{name:12s} {seconds:7.2f} s  {got.sum():5d} tokens {rate[name]:8.1f} "
          f"tokens/s  roofline_fraction {roofline(got) / seconds:.2f}")
  print(f"continuous_vs_static={rate['continuous'] / rate['static']:.2f}")
  print(f"continuous_vs_hf_generate={rate['continuous'] / rate['hf generate']:.2f}")


if __name__ == "__main__":
  main()
