"""The engine as a 2-process job (2 x 4 CPU devices), against one process.

Each process feeds only its own prompt rows and gets back only its own sample
rows: the multi-controller path of a pod slice. The job runs this file as a
script (`_worker` below) through launch/local.sh.
"""
from pathlib import Path
import sys

import numpy as np

from isr_dpo_jax import sampling

SAMPLE = sampling.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6)
FIELDS = ("tokens", "logprobs", "lengths", "stopped")


def test_two_processes_generate_what_one_does(tmp_path):
  # pylint: disable=g-import-not-at-top
  import hf_reference as ref
  from test_distributed import _run_job
  from test_distributed import LOCAL_SH
  import tolerance

  from isr_dpo_jax import models

  ref.tiny_model(seed=6).save_pretrained(tmp_path)
  model = models.load_pretrained(tmp_path)
  ids, mask = ref.video_prompts([5, 8, 2, 6], model.config.num_video_tokens)
  batch = dict(ids=ids.astype(np.int32), mask=mask.astype(bool),
               videos=ref.videos(4), uids=np.arange(4, dtype=np.int32))
  np.savez(tmp_path / "batch.npz", **batch)
  want = sampling.Sampler(model)(*batch.values(), SAMPLE, num_samples=2)

  _run_job([str(LOCAL_SH), "2", "--devices", "4", "--log-dir",
            str(tmp_path / "logs"), "--", sys.executable, __file__,
            str(tmp_path)])
  for process in range(2):
    got = np.load(tmp_path / f"samples_{process}.npz")
    rows = slice(*(2 * got["prompt_rows"]))  # 2 samples per prompt
    assert rows == slice(4 * process, 4 * process + 4)
    for field in FIELDS:
      tolerance.assert_close(got[field], getattr(want, field)[rows],
                             err_msg=field)


def _worker(workdir):
  """One process: its rows of the batch in, its rows of the samples out."""
  # pylint: disable=g-import-not-at-top
  import jax

  from isr_dpo_jax import distributed
  from isr_dpo_jax import models
  from isr_dpo_jax import parallel

  distributed.initialize(timeout_s=60)
  workdir = Path(workdir)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sampler = sampling.Sampler(models.load_pretrained(workdir, mesh=mesh), mesh)
  batch = np.load(workdir / "batch.npz")
  rows = distributed.process_slice(len(batch["ids"]))  # as the stages split
  out = sampler(*(batch[k][rows] for k in ("ids", "mask", "videos", "uids")),
                SAMPLE, num_samples=2)
  np.savez(workdir / f"samples_{jax.process_index()}.npz",
           prompt_rows=np.array([rows.start, rows.stop]),
           **{field: getattr(out, field) for field in FIELDS})


if __name__ == "__main__":
  _worker(*sys.argv[1:])
