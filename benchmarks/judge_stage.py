"""The judge stage at the demo's shapes: this judge against judging each order
on its own (the judge before its orders shared a prefill).

configs/demo.py's model (LLaMA hidden 128 x 4 layers, a 64-wide tower, 40
video tokens) and judge (generative verdicts, 16 new tokens at most, greedy;
batches of self_judge.batch_size pairs, sampling.buckets) on a synthetic
world of --videos clips, pi_0 as bootstrap writes it (untrained). Each pair
is one of the world's questions with its right answer and a wrong one (an
answer swapped for another of its kind, as the loop's answers of 6-12 tokens
differ), or --identical-share of them the right answer twice; every pair is
judged with the clip's description (its first --context-words words, about
the demo's contexts' 96 tokens at most) as c_t.

  before  each order a prompt of its own: its own video encoding and prefill,
          identical pairs judged too
  after   judges.make(config, ...): identical pairs skipped, the orders
          sharing one prefill of video, context and question

Both run through one Policy; each is run once to compile, then --repeats
times interleaved, and the median is printed.

  python benchmarks/judge_stage.py
  python benchmarks/judge_stage.py --mode likelihood --identical-share 0

The last line printed is judge_stage_speedup=<before s / after s>.
"""
import argparse
import statistics
import tempfile
import time
import pathlib

import numpy as np

from isr_dpo_jax import bootstrap
from isr_dpo_jax import generate
from isr_dpo_jax import judge
from isr_dpo_jax import judges
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import sampling
from isr_dpo_jax import settings
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes

DEMO = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def demo_config(mode: str, videos: int):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("demo", DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.world.num_videos = dict(train=videos, test=1)
  config.self_judge.mode = mode
  return config


def demo_pairs(setup: bootstrap.Setup, policy: policy_lib.Policy, config, *,
               num_pairs: int, identical_share: float, context_words: int, seed=0
               ) -> list[judges.Pair]:
  """The world's questions answered right and wrong (or right twice)."""
  rng = np.random.default_rng(seed)
  clips = [records.parse_line(line)
           for _, line in records.iter_lines(setup.ground_truth)]
  clips = [c for c in clips if c["split"] == "train"]
  prompts = settings.prompts(config)
  pairs = []
  for i in range(num_pairs):
    clip = clips[i % len(clips)]
    qa = clip["qa"][rng.integers(len(clip["qa"]))]
    right = qa["response"]
    wrong = right.replace(qa["answer"], scenes.alternatives(qa["answer"])[0])
    y1, y2 = ((right, right) if rng.random() < identical_share else
              (right, wrong) if rng.random() < 0.5 else (wrong, right))
    context = " ".join(clip["description"].split()[:context_words])
    pairs.append(judges.Pair(
        f"{clip['id']}:{i}", clip["video"], qa["question"], (y1, y2), context,
        judge.judge_questions(prompts, qa["question"], y1, y2, context),
        policy.video(clip["video"])))
  return pairs


def each_order_alone(policy: policy_lib.Policy, config, pairs, seed: int):
  """The previous judges' passes: one prompt per order, every pair."""
  questions = [q for p in pairs for q in p.orders]
  frames = [p.pixels for p in pairs for _ in p.orders]
  if config.self_judge.mode == "likelihood":
    return policy.next_token_logprobs(questions, frames, policy.letter_ids("AB"))
  uids = [generate.stable_uid("verdict", p.id, o) for p in pairs for o in (0, 1)]
  params = sampling.SamplingParams(temperature=0.0,
                                   max_new_tokens=config.self_judge.max_new_tokens)
  return policy.sample(questions, frames, uids, params, seed=seed)


def stage_seconds(fn, pairs, batch_size: int) -> float:
  """fn over the pairs in the stage's batches, as stages.judgments calls it."""
  start = time.perf_counter()
  for first in range(0, len(pairs), batch_size):
    fn(pairs[first:first + batch_size])
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", default="generative", choices=["generative", "likelihood"])
  parser.add_argument("--pairs", type=int, default=64)
  parser.add_argument("--videos", type=int, default=16)
  parser.add_argument("--identical-share", type=float, default=0.25)
  parser.add_argument("--context-words", type=int, default=70)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = demo_config(args.mode, args.videos)
  with tempfile.TemporaryDirectory() as workdir:
    setup = bootstrap.prepare(config, pathlib.Path(workdir))
    policy = policy_lib.Policy.from_config(config, setup,
                                           parallel.make_mesh(dict(config.mesh)))
    pairs = demo_pairs(setup, policy, config, num_pairs=args.pairs,
                       identical_share=args.identical_share,
                       context_words=args.context_words)
    judge_fn = judges.make(config, policy, seed=0)
    sides = {"before": lambda batch: each_order_alone(policy, config, batch, 0),
             "after": judge_fn}
    batch = config.self_judge.batch_size
    times = {name: [] for name in sides}
    for repeat in range(args.repeats + 1):  # the first compiles
      for name, fn in sides.items():
        seconds = stage_seconds(fn, pairs, batch)
        if repeat:
          times[name].append(seconds)
  lengths = [len(policy.encoder.prompt(q)) for p in pairs for q in p.orders]
  same = sum(judge.identical(*p.responses) for p in pairs)
  print(f"judge={args.mode} pairs={len(pairs)} identical={same} batch={batch} "
        f"judge prompt tokens {min(lengths)}-{max(lengths)} "
        f"(video {policy.model.video.num_tokens}) buckets={tuple(config.sampling.buckets)}")
  median = {name: statistics.median(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"{name:7s} median {median[name]:.3f} s  runs "
          + " ".join(f"{x:.3f}" for x in t))
  print(f"judge_stage_speedup={median['before'] / median['after']:.2f}")


if __name__ == "__main__":
  main()
