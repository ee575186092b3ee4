"""Per-step training metrics: one jsonl line and TensorBoard scalars per step.

The jsonl file is the machine-readable record (plots and reports read it); the
TensorBoard event files are for watching a run live. Only process 0 writes, so
multi-host runs produce one copy.

Each step is recorded once. A run resumed from a checkpoint redoes the steps
after it, some of which a killed run may have recorded; the resumed run
computes them again to the same values, and the writer keeps the first
record rather than adding a second.
"""
import json
import os
import secrets
from collections.abc import Mapping

import numpy as np
import tensorboardX

from isr_dpo_jax import distributed
from isr_dpo_jax.data import records


class MetricsWriter:
  """Appends `{"step": s, **metrics}` to `<workdir>/metrics.jsonl` and events.

  A step already in the file (written before a resume) is not written again.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    _drop_partial_last_line(self.path)
    self._written = ({row["step"] for row in read_metrics(self.path)}
                     if os.path.exists(self.path) else set())
    self._jsonl = open(self.path, "a", encoding="utf-8")
    # Event files are named by the second they were opened in: without a
    # suffix, a writer reopened within the same second would overwrite them.
    self._tb = tensorboardX.SummaryWriter(os.fspath(workdir),
                                          filename_suffix=f".{secrets.token_hex(4)}")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes scalar metrics (Python or array scalars) for one step."""
    if not self.enabled or int(step) in self._written:
      return
    self._written.add(int(step))
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _drop_partial_last_line(path: str) -> None:
  """Truncates a line cut short by a killed run, so appends start clean."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Reads a metrics file back, one row per step in step order.

  A partial last line (killed run) is ignored. Files that older versions
  wrote may repeat steps redone after a resume; the latest row wins.
  """
  by_step = {}
  for _, line in records.iter_lines(path):
    if line.endswith(b"\n"):
      row = records.parse_line(line)
      by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]
