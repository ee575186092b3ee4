"""Peak host memory of `load_pretrained` on a ~1 GB float32 checkpoint, 8 CPU devices.

Writes a wide, shallow random Video-LLaVA (Hugging Face layout, 256 MB safetensors
shards with an index) to a temporary directory, then loads it in a fresh process
onto an 8-device CPU mesh and reports the peak resident memory above the
process's resident memory just before loading, against the loaded model's own
bytes (all device buffers, which live in host memory on CPU) and its largest
tensor. Streaming loads should need at most about two largest tensors on top of
the model itself, never a second copy of the model.

  python benchmarks/load_memory.py [--hidden 2048] [--layers 2] [--mesh fsdp=4,tensor=2]
                                   [--stored-dtype bfloat16]

Measured on a 2-core VM shared with other jobs (vocab 32000, hidden 2048, 2 LLM
layers: model 915 MiB in float32, largest tensor 250 MiB; loaded as float32):

  mesh               stored    peak above baseline  above the model  x largest  load
  fsdp=4,tensor=2    float32   1170 MiB             255 MiB          1.02       2.6 s
  fsdp=8             float32   1170 MiB             256 MiB          1.02       3.2 s
  fsdp=4,tensor=2    bfloat16  1322 MiB             407 MiB          1.63       2.0 s

(float32: the one stored tensor in flight; bfloat16: the stored tensor plus the
float32 slices cast from it.)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def _config(hidden: int, layers: int):
  from isr_dpo_jax import models  # pylint: disable=g-import-not-at-top
  return models.VideoLlavaConfig(
      text=models.LlamaConfig(vocab_size=32000, hidden_size=hidden,
                              intermediate_size=hidden * 11 // 4, num_layers=layers,
                              num_heads=hidden // 128, num_kv_heads=hidden // 128),
      vision=models.VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2,
                                 num_heads=4, temporal_attention=False))


def write_checkpoint(path: str, hidden: int, layers: int, dtype: str) -> None:
  """A random model saved by save_pretrained, one leaf generated at a time."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from isr_dpo_jax import models  # pylint: disable=g-import-not-at-top
  cfg = _config(hidden, layers)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.VideoLlava(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jax.numpy.asarray(
      rng.standard_normal(x.shape, np.float32) * 0.02, dtype), state)
  models.save_pretrained(nnx.merge(graphdef, state), path, max_shard_bytes=256 * MIB)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def measure_load(path: str, mesh_shape: dict[str, int]) -> dict:
  """Loads the checkpoint in this (fresh) process; memory numbers in bytes."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from isr_dpo_jax import models, parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(mesh_shape)
  gc.collect()
  baseline, peak_before = _rss_bytes(), _peak_rss_bytes()
  start = time.perf_counter()
  leaves = jax.tree.leaves(nnx.state(models.load_pretrained(path, mesh=mesh)))
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - start
  return {
      "baseline": baseline, "peak_before": peak_before, "peak": _peak_rss_bytes(),
      "model": sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
      "largest": max(x.nbytes for x in leaves), "devices": len(jax.devices()),
      "seconds": seconds,
  }


def _run_child(*args: str) -> str:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  return subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                        capture_output=True, text=True).stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--mesh", default="fsdp=4,tensor=2")
  parser.add_argument("--stored-dtype", default="float32",
                      help="dtype written to the checkpoint; it is loaded as float32")
  parser.add_argument("--write", help=argparse.SUPPRESS)  # Child: checkpoint to write.
  parser.add_argument("--measure", help=argparse.SUPPRESS)  # Child: checkpoint to load.
  args = parser.parse_args()
  mesh_shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  if args.write:
    write_checkpoint(args.write, args.hidden, args.layers, args.stored_dtype)
    return
  if args.measure:
    print(json.dumps(measure_load(args.measure, mesh_shape)))
    return
  # Both steps run in children of this small process: Linux carries the peak RSS
  # (ru_maxrss) of a parent over into a forked child.
  with tempfile.TemporaryDirectory() as path:
    _run_child("--write", path, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--stored-dtype", args.stored_dtype)
    out = _run_child("--measure", path, "--mesh", args.mesh)
  r = json.loads(out.strip().splitlines()[-1])
  extra = r["peak"] - r["baseline"]
  over_model = extra - r["model"]
  print(f"{r['devices']} devices, mesh {args.mesh}, stored {args.stored_dtype}: "
        f"model {r['model'] / MIB:.1f} MiB, largest tensor {r['largest'] / MIB:.1f} MiB, "
        f"baseline {r['baseline'] / MIB:.1f} MiB (peak before load "
        f"{r['peak_before'] / MIB:.1f} MiB)")
  print(f"peak extra over baseline {extra / MIB:.1f} MiB -> {over_model / MIB:.1f} MiB above "
        f"the model = {over_model / r['largest']:.2f} x the largest tensor (bound: 2x), "
        f"load {r['seconds']:.1f} s")


if __name__ == "__main__":
  main()
