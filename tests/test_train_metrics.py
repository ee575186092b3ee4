"""Metrics writer: jsonl rows and TensorBoard event records, resume-safe."""
import glob
import json
import struct

import jax.numpy as jnp
from tensorboardX.proto import event_pb2

from isr_dpo_jax import metrics


def _read_tb_scalars(workdir):
  """Parses TFRecord-framed Event protos: {tag: [(step, value)]}."""
  scalars = {}
  for path in glob.glob(str(workdir / "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]  # skip length crc
      offset += 12 + length + 4  # and the data crc
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(
            (event.step, value.simple_value))
  return scalars


def test_writes_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
    writer.write(1, {"loss": jnp.float32(0.5), "rewards/accuracies": 1.0})
    writer.write(2, {"loss": 0.25, "rewards/accuracies": 0.5})
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 1, "loss": 0.5, "rewards/accuracies": 1.0},
                  {"step": 2, "loss": 0.25, "rewards/accuracies": 0.5}]
  scalars = _read_tb_scalars(tmp_path)
  assert scalars["loss"] == [(1, 0.5), (2, 0.25)]
  assert scalars["rewards/accuracies"] == [(1, 1.0), (2, 0.5)]


def test_resumed_run_records_each_step_once_and_drops_partial_line(tmp_path):
  with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "lo')  # killed mid-line
  # Resumed from a checkpoint at step 2: steps 3 and 4 are computed again.
  with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
    writer.write(3, {"loss": 3.0})
    writer.write(4, {"loss": 4.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
  assert sorted(_read_tb_scalars(tmp_path)["loss"]) == [(s, float(s)) for s in (1, 2, 3, 4)]


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricsWriter(tmp_path / "m", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "m").exists()
