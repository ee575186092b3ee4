"""Continuous batching as a 2-process job (2 x 4 CPU devices), against one
process.

Each process streams only its own prompts through its own slots, as the
stages' processes do, and the two streams differ in length and in prompt
widths: the processes must agree on every insert's size and bucket, and one
runs dummy inserts and decode rows once its stream is done. The job runs this
file as a script (`_worker` below) through launch/local.sh.
"""
from pathlib import Path
import sys

import hf_reference as ref
import numpy as np

from isr_dpo_jax import generate
from isr_dpo_jax import models
from isr_dpo_jax import sampling
from test_continuous_batching import SAMPLED

BUCKETS = (8, 16, 32)
SPLIT = 14  # process 0 streams prompts [:SPLIT], process 1 the rest
# Per process: 8 prompts, 16 sample rows over the mesh's 4 data shards (2 a
# process), 4 prompt slots a device: its drain moves into 1 (Slots.keep).
SLOTS = 8


def _prompts(workdir) -> list[generate.Prompt]:
  """prompts.npz's prompts, each with a stable uid (as the stages give)."""
  saved = np.load(workdir / "prompts.npz")
  ids = np.split(saved["ids"], np.cumsum(saved["lengths"])[:-1])
  return [generate.Prompt(i.tolist(), v, uid=int(u))
          for i, v, u in zip(ids, saved["videos"], saved["uids"])]


def _generate(sampler, prompts) -> dict[str, np.ndarray]:
  """Each prompt's 2 samples: token ids [P, 2, max_new_tokens] (-1 past
  their length), lengths, log-probs and whether they stopped."""
  results = list(generate.generate(
      sampler, prompts, SAMPLED, tokenizer=ref.word_tokenizer(), batch_size=SLOTS,
      num_samples=2, seed=3, buckets=BUCKETS, progress=False))
  tokens = np.full((len(results), 2, SAMPLED.max_new_tokens), -1)
  for p, samples in enumerate(results):
    for j, s in enumerate(samples):
      tokens[p, j, :s.length] = s.token_ids
  field = lambda f: np.array([[f(s) for s in r] for r in results])
  return dict(tokens=tokens, lengths=field(lambda s: s.length),
              logprobs=field(lambda s: s.logprob),
              stopped=field(lambda s: s.finish_reason == "eos"))


def test_two_processes_stream_what_one_process_does(tmp_path):
  # pylint: disable=g-import-not-at-top
  from test_distributed import _run_job
  from test_distributed import LOCAL_SH
  import tolerance

  ref.tiny_model(seed=8, num_kv_heads=2).save_pretrained(tmp_path)
  model = models.load_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  lengths = [3, 9, 2, 5, 4, 6, 3, 11, 7, 2, 13, 5, 8, 4,  # process 0's refill
             14, 27, 20, 8, 16, 25, 9, 12]  # process 1's are longer
  ids = [[1] + [ref.VIDEO_ID] * model.config.num_video_tokens
         + rng.integers(3, 90, n).tolist() for n in lengths]
  np.savez(tmp_path / "prompts.npz", ids=np.concatenate(ids),
           lengths=[len(i) for i in ids], videos=ref.videos(len(ids), seed=1),
           uids=1000 + np.arange(len(ids)))
  want = _generate(sampling.Sampler(model), _prompts(tmp_path))
  assert len(set(want["lengths"].ravel())) > 1  # slots free at different steps

  _run_job([str(LOCAL_SH), "2", "--devices", "4", "--log-dir",
            str(tmp_path / "logs"), "--", sys.executable, __file__,
            str(tmp_path)])
  for process, prompts in enumerate((slice(0, SPLIT), slice(SPLIT, None))):
    got = np.load(tmp_path / f"samples_{process}.npz")
    assert got["kept"].tolist() == [2], got["kept"]  # 1 slot a device at the end
    for field in want:
      tolerance.assert_close(got[field], want[field][prompts], err_msg=field)


def _worker(workdir):
  """One process: its own prompts streamed through its slots, its samples out."""
  # pylint: disable=g-import-not-at-top
  import jax

  from isr_dpo_jax import distributed
  from isr_dpo_jax import parallel

  distributed.initialize(timeout_s=60)
  workdir = Path(workdir)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sampler = sampling.Sampler(models.load_pretrained(workdir, mesh=mesh), mesh)
  prompts = _prompts(workdir)
  mine = prompts[:SPLIT] if jax.process_index() == 0 else prompts[SPLIT:]
  kept, keep = [], sampling.Slots.keep

  def recorded(slots, slots_G):
    kept.append(len(slots_G))
    keep(slots, slots_G)

  sampling.Slots.keep = recorded
  samples = _generate(sampler, mine)
  np.savez(workdir / f"samples_{jax.process_index()}.npz",
           kept=np.array(kept, int), **samples)


if __name__ == "__main__":
  _worker(*sys.argv[1:])
