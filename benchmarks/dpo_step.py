"""One DPO update: ours (JAX, plain and packed rows) against PyTorch (TRL-style).

Both sides start from the same checkpoint (a random ~60M-parameter
transformers VideoLlava: LLM hidden 512, 8 layers, vocab 32064; a 2-layer
CLIP tower on 8 frames of 64 px, 65 tokens each) and the same batch (prompts
of 520 video tokens + 41 text tokens, responses of 48..64 tokens).

- torch: TRL's default DPO step. Chosen and rejected rows concatenated on the
  batch axis, the video tower run for every row, logits over the whole rows,
  reference log-probs from a second frozen copy of the model in the same
  step, the sigmoid loss, global-norm clipping, torch AdamW; the tower and
  projector frozen. bf16 = autocast over float32 weights, as HF Trainer does.
- ours: `Trainer.dpo_update`: the tower once per pair (its own jitted call),
  then one jitted update (rows [prompt ; response] or one packed row per
  pair, output head on response positions only), reference log-probs read
  from the pairs (computed once per iteration: timed on its own); bf16 =
  bfloat16 compute over float32 master weights.

Each side runs in its own process, so peak memory is its own: on a GPU the
allocator's peak (torch.cuda.max_memory_allocated, XLA's peak_bytes_in_use),
on a CPU the peak resident memory above the process's baseline. Model FLOPs
are counted analytically for what each side computes (matmuls only,
attention over full L x L score blocks, backward = 2 x forward) and MFU is
against a 2048^3 matmul in the run's dtype, measured by each framework.

  python benchmarks/dpo_step.py                                   # CPU, float32
  python benchmarks/dpo_step.py --device=cuda --dtype=bfloat16 --pairs=32

Measured on one H200 (bf16, 32 pairs, 10 timed steps; jax 0.11.2, flax
0.12.10, torch 2.11, transformers 5.17):

           pairs/s  peak MiB  TFLOP/step  MFU vs torch's 650 TFLOP/s matmul
  torch      217.4     30085      15.27   16.0%
  plain      619.1     15723       7.84   23.3%
  packed     965.8      9855       4.59   21.3%
  reference log-probs (once per iteration): 1562 (plain), 2118 (packed) pairs/s
  speedup_vs_torch=4.44 (packed); plain: 2.85

(That run timed single 2048^3 products, which JAX's dispatch cost held to
336-413 TFLOP/s, hence the common torch peak above; the chained products
now timed fix that.) On the 2-core CPU VM (float32, 2 pairs; shared, so
+-50% between runs): torch 0.23 pairs/s and 4214 MiB, plain 0.23 and 3723
MiB, packed 0.67 and 2780 MiB, speedup_vs_torch=2.92 (packed).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

VIDEO_ID = 32001
TEXT_TOKENS = 41  # bos + 20 before the video + 20 after it
# The matmul peak: a chain of dependent 2048^3 products per timed call, so
# that neither framework's dispatch cost shows in it.
MATMUL_CHAIN = 10
MATMUL_FLOPS = MATMUL_CHAIN * 2 * 2048**3


def _hf_config(args):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.VideoLlavaConfig(
      text_config=dict(model_type="llama", hidden_size=args.hidden,
                       intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
      vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, image_size=64, patch_size=8,
                         projection_dim=256),
      video_token_index=VIDEO_ID, image_token_index=VIDEO_ID - 1,
      vision_feature_select_strategy="full", video_seq_length=args.frames * 65)


def _make_inputs(args, workdir):
  """Writes the checkpoint and the batch that both sides read."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.VideoLlavaForConditionalGeneration(_hf_config(args))
  model.save_pretrained(os.path.join(workdir, "model"))
  rng = np.random.default_rng(0)
  b, t = args.pairs, args.response_len
  text = rng.integers(3, 32000, (b, TEXT_TOKENS - 1))
  prompt = np.concatenate([np.ones((b, 1)), text[:, :20], np.full((b, args.frames * 65), VIDEO_ID),
                           text[:, 20:]], axis=1).astype(np.int32)
  responses = {}
  for name in ("chosen", "rejected"):
    lengths = rng.integers(t * 3 // 4, t + 1, b)
    ids = rng.integers(3, 32000, (b, t)).astype(np.int32)
    mask = np.arange(t) < lengths[:, None]
    ids[np.arange(b), lengths - 1] = 2  # eos
    responses[f"{name}_ids"] = np.where(mask, ids, 0)
    responses[f"{name}_mask"] = mask
  videos = rng.standard_normal((b, args.frames, 64, 64, 3)).astype(np.float32)
  np.savez(os.path.join(workdir, "batch.npz"), prompt_ids=prompt,
           prompt_mask=np.ones(prompt.shape, bool), videos=videos, **responses)
  return sum(p.numel() for p in model.parameters())


def _forward_flops(args, rows, length, head_positions):
  """Matmul FLOPs of one forward of the LLM (+ nothing else)."""
  d, layers = args.hidden, args.layers
  linear = layers * (4 * d * d + 3 * d * (d * 11 // 4))
  attention = layers * 4 * length * d  # QK^T and PV, per query position
  return 2 * rows * length * linear + rows * length * attention + 2 * d * 32064 * head_positions


def _tower_flops(args, videos):
  tokens, width = 65, 256
  per_frame = 2 * tokens * (4 * width * width + 2 * width * 1024) + 4 * tokens * tokens * width
  projector = 2 * tokens * (256 * args.hidden + args.hidden * args.hidden)
  return videos * args.frames * (per_frame + projector)  # one of two tower layers is skipped


def step_flops(args, side):
  """Model FLOPs of one update as each side computes it."""
  b, t = args.pairs, args.response_len
  prompt = TEXT_TOKENS + args.frames * 65
  if side == "torch":  # policy fwd + bwd, reference fwd; tower per row and pass
    forward = _forward_flops(args, 2 * b, prompt + t, 2 * b * (prompt + t))
    return 4 * forward + 2 * _tower_flops(args, 2 * b)
  if side == "plain":
    forward = _forward_flops(args, 2 * b, prompt + t, 2 * b * t)
  else:
    forward = _forward_flops(args, b, prompt + 2 * t, 2 * b * t)
  return 3 * forward + _tower_flops(args, b)


def _rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(step, warmup, steps, sync):
  for _ in range(warmup):
    sync(step())
  start = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  return (time.perf_counter() - start) / steps


def _torch_worker(args, workdir):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  baseline = _rss_mib()
  device = torch.device(args.device)
  sync = (lambda _: torch.cuda.synchronize()) if args.device == "cuda" else (lambda _: None)
  data = {k: torch.from_numpy(v).to(device) for k, v in np.load(os.path.join(workdir, "batch.npz")).items()}
  load = lambda: transformers.VideoLlavaForConditionalGeneration.from_pretrained(
      os.path.join(workdir, "model"), dtype=torch.float32).to(device)
  policy, reference = load(), load().eval().requires_grad_(False)
  for name, p in policy.named_parameters():
    p.requires_grad_(not name.startswith(("model.video_tower", "model.image_tower",
                                          "model.multi_modal_projector")))
  trained = [p for p in policy.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trained, lr=1e-6, weight_decay=0.0)
  ids = torch.cat([torch.cat([data["prompt_ids"], data[f"{n}_ids"]], 1) for n in ("chosen", "rejected")])
  mask = torch.cat([torch.cat([data["prompt_mask"], data[f"{n}_mask"]], 1) for n in ("chosen", "rejected")])
  loss_mask = mask.clone()
  loss_mask[:, :data["prompt_ids"].shape[1]] = False
  pixels = data["videos"].permute(0, 1, 4, 2, 3).repeat(2, 1, 1, 1, 1)
  autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def logps(model):
    logits = model(input_ids=ids.long(), attention_mask=mask.long(), pixel_values_videos=pixels).logits
    logits, labels = logits[:, :-1].float(), ids[:, 1:].long()
    token = logits.gather(-1, labels[..., None])[..., 0] - logits.logsumexp(-1)
    return (token * loss_mask[:, 1:]).sum(-1).chunk(2)

  def step():
    with autocast:
      chosen, rejected = logps(policy)
      with torch.no_grad():
        ref_chosen, ref_rejected = logps(reference)
    z = (chosen - rejected) - (ref_chosen - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(0.1 * z).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  seconds = _timed(step, args.warmup, args.steps, sync)
  w = torch.randn(2048, 2048, device=device, dtype=getattr(torch, args.dtype)) / 2048**0.5

  def chain():
    z = w
    for _ in range(MATMUL_CHAIN):
      z = z @ w
    return z

  matmul = _timed(chain, 1, 3, sync)
  if args.device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
  return {"seconds": seconds, "peak_mib": peak, "matmul_flops_per_s": MATMUL_FLOPS / matmul}


def _jax_worker(args, workdir, packed):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from isr_dpo_jax import models, parallel, train  # pylint: disable=g-import-not-at-top
  from isr_dpo_jax.data import batching  # pylint: disable=g-import-not-at-top
  baseline = _rss_mib()
  data = dict(np.load(os.path.join(workdir, "batch.npz")))
  videos = data.pop("videos")
  batch = batching.PreferenceBatch(**data)
  mesh = parallel.make_mesh({}, devices=jax.devices()[:1])
  dtype = getattr(jnp, args.dtype)
  model = models.load_pretrained(os.path.join(workdir, "model"), dtype=dtype,
                                 param_dtype=jnp.float32, mesh=mesh)
  config = train.TrainConfig(learning_rate=1e-6, warmup_ratio=0.0, packed=packed)
  trainer = train.Trainer(model, config, mesh, total_steps=1000)
  state = trainer.init_state(model)
  del model
  sync = jax.block_until_ready
  reference = trainer.reference_logps(state.params, batch, videos)
  reference_seconds = _timed(lambda: trainer.reference_logps(state.params, batch, videos),
                             0, args.steps, lambda _: None)

  def step():
    nonlocal state
    state, metrics = trainer.dpo_update(state, batch, videos, *reference)
    return metrics

  seconds = _timed(step, args.warmup, args.steps, sync)
  w = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)) / 2048**0.5, dtype)
  chain = jax.jit(lambda w: jax.lax.fori_loop(0, MATMUL_CHAIN, lambda _, z: z @ w, w))
  matmul = _timed(lambda: chain(w), 1, 3, sync)
  stats = jax.devices()[0].memory_stats() if args.device == "cuda" else None
  if stats:
    peak = stats["peak_bytes_in_use"] / 2**20
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
  return {"seconds": seconds, "peak_mib": peak, "matmul_flops_per_s": MATMUL_FLOPS / matmul,
          "reference_seconds": reference_seconds}


def _run_worker(side, args, workdir):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if args.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, __file__, f"--worker={side}", f"--workdir={workdir}"] + [
      f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "workdir")]
  out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--response-len", type=int, default=64)
  parser.add_argument("--worker", choices=("torch", "plain", "packed"))
  parser.add_argument("--workdir")
  args = parser.parse_args()
  if args.worker:
    if args.worker == "torch":
      result = _torch_worker(args, args.workdir)
    else:
      result = _jax_worker(args, args.workdir, packed=args.worker == "packed")
    print(json.dumps(result))
    return

  with tempfile.TemporaryDirectory() as workdir:
    num_params = _make_inputs(args, workdir)
    print(f"model {num_params / 1e6:.1f}M parameters; {args.pairs} pairs of prompt "
          f"{TEXT_TOKENS + args.frames * 65} + responses {args.response_len} tokens; "
          f"{args.device} {args.dtype}")
    results = {side: _run_worker(side, args, workdir) for side in ("torch", "plain", "packed")}
  print(f"{'':8}{'pairs/s':>10}{'peak MiB':>10}{'TFLOP/step':>12}{'matmul TFLOP/s':>16}{'MFU':>7}")
  for side, r in results.items():
    flops = step_flops(args, side)
    mfu = flops / r["seconds"] / r["matmul_flops_per_s"]
    print(f"{side:8}{args.pairs / r['seconds']:10.2f}{r['peak_mib']:10.0f}{flops / 1e12:12.3f}"
          f"{r['matmul_flops_per_s'] / 1e12:16.3f}{mfu:7.1%}")
  for side in ("plain", "packed"):
    print(f"{side}: reference log-probs (once per iteration) "
          f"{args.pairs / results[side]['reference_seconds']:.2f} pairs/s")
  best = min(("plain", "packed"), key=lambda s: results[s]["seconds"])
  speedup = results["torch"]["seconds"] / results[best]["seconds"]
  print(f"best of ours: {best}")
  print(f"speedup_vs_torch={speedup:.2f}")


if __name__ == "__main__":
  main()
