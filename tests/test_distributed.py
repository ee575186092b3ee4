"""Multi-process start-up: layout resolution, real 2-process jobs, join errors.

The real jobs run this file as a script (`_worker` below) in 2 processes x 4
CPU devices, through launch/local.sh and through JAX's Slurm detection.
"""
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

import pytest

from isr_dpo_jax import distributed

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
JOB_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def no_tpu(monkeypatch):
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)


def test_nothing_set_is_single_process():
  assert distributed.resolve_layout(environ={}) is None
  assert distributed.initialize() is None


def test_flags_win_over_our_variables():
  environ = {"ISR_DPO_COORDINATOR": "a:1", "ISR_DPO_NUM_PROCESSES": "4",
             "ISR_DPO_PROCESS_ID": "3", "ISR_DPO_LOCAL_DEVICE_IDS": "0,1"}
  layout = distributed.resolve_layout("b:2", process_id=1, environ=environ)
  assert layout == distributed.Layout("explicit", "b:2", 4, 1, (0, 1))


def test_partial_layout_without_cluster_names_the_missing_values():
  with pytest.raises(ValueError, match="missing: num_processes, process_id"):
    distributed.resolve_layout(environ={"ISR_DPO_COORDINATOR": "a:1"})


def test_process_id_out_of_range():
  with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
    distributed.resolve_layout("a:1", 2, 2, environ={})


@pytest.mark.parametrize("environ, source", [
    ({"SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[01-02]"}, "slurm"),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "gpu01"}, None),
    ({"SLURM_NTASKS": "16"}, None),  # batch script outside srun
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1"},
     "ompi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
])
def test_cluster_detection_leaves_values_to_jax(environ, source):
  layout = distributed.resolve_layout(environ=environ)
  expected = source and distributed.Layout(source)
  assert layout == expected


def test_flags_complete_a_cluster_layout():
  environ = {"SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[01-02]"}
  layout = distributed.resolve_layout("gpu01:1234", environ=environ)
  assert layout == distributed.Layout("slurm", "gpu01:1234")


def test_open_mpi_5_needs_a_coordinator():
  environ = {"OMPI_COMM_WORLD_SIZE": "4"}
  with pytest.raises(ValueError, match="ISR_DPO_COORDINATOR=host:port"):
    distributed.resolve_layout(environ=environ)
  layout = distributed.resolve_layout(
      environ={**environ, "JAX_COORDINATOR_ADDRESS": "h:1"})
  assert layout == distributed.Layout("ompi", "h:1")


def test_bad_integer_names_the_variable():
  with pytest.raises(ValueError, match="ISR_DPO_NUM_PROCESSES='two'"):
    distributed.resolve_layout(environ={"ISR_DPO_NUM_PROCESSES": "two"})


def test_tpu_vm_is_left_to_jax(monkeypatch):
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
  assert distributed.resolve_layout(environ={}) == distributed.Layout("tpu")


def test_two_processes_through_local_sh(tmp_path):
  _run_job([str(LOCAL_SH), "2", "--devices", "4", "--log-dir",
            str(tmp_path / "logs"), "--", sys.executable, __file__,
            "explicit", str(tmp_path)])
  assert (tmp_path / "written_by_main").read_text() == "0"


def test_two_processes_through_slurm_detection(tmp_path):
  [port] = _free_ports(1)
  environ = _job_environ(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
                         SLURM_NTASKS="2", JAX_COORDINATOR_PORT=port)
  procs = [
      subprocess.Popen([sys.executable, __file__, "slurm", str(tmp_path)],
                       env={**environ, "SLURM_PROCID": str(i),
                            "SLURM_LOCALID": str(i)},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
      for i in range(2)]
  try:
    for proc in procs:
      output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
      assert proc.returncode == 0, output
  finally:
    for proc in procs:
      proc.kill()


def test_join_errors_arrive_within_the_timeout():
  """A dead coordinator port, and a coordinator whose peer never comes."""
  timeout_s = 3
  dead, alone = (f"127.0.0.1:{port}" for port in _free_ports(2))
  cases = {"unreachable": (dead, 2, 1), "missing peer": (alone, 2, 0)}
  start = time.monotonic()
  procs = {name: subprocess.Popen(
      [sys.executable, "-c",
       "import sys; from isr_dpo_jax import distributed; "
       "distributed.initialize(sys.argv[1], int(sys.argv[2]), "
       "int(sys.argv[3]), timeout_s=float(sys.argv[4]))",
       *map(str, args), str(timeout_s)],
      env=_job_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for name, args in cases.items()}
  errors = {}
  try:
    for name, proc in procs.items():
      _, errors[name] = proc.communicate(timeout=60)
      assert proc.returncode == 1, errors[name]
  finally:
    for proc in procs.values():
      proc.kill()
  assert time.monotonic() - start < timeout_s + 20  # + start-up of python, jax
  assert (f"Process 1 of 2 processes could not reach the coordinator at "
          f"{dead} within 3 s") in errors["unreachable"]
  assert (f"Process 0 of 2 processes: the coordinator at {alone} did not "
          f"see all 2 processes join within 3 s") in errors["missing peer"]


def _run_job(command):
  """Runs a launcher, once more if it fails (a port taken in between)."""
  for attempt in range(2):
    proc = subprocess.Popen(command, env=_job_environ(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
      output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)  # local.sh stops its processes
      output, _ = proc.communicate()
    if proc.returncode == 0:
      return
  pytest.fail(f"{command} failed twice; last output:\n{output}")


def _job_environ(**extra):
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(("ISR_DPO_", "SLURM_", "OMPI_"))}
  environ.update(JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 PYTHONPATH=str(REPO), **extra)
  return environ


def _free_ports(count):
  """Distinct ports that were free a moment ago."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [str(s.getsockname()[1]) for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _worker(expected_source, shared_dir):
  """One process of a 2 x 4-device job: checks the job against NumPy."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from isr_dpo_jax import parallel

  layout = distributed.initialize(timeout_s=60)
  assert layout.source == expected_source, layout
  index = jax.process_index()
  assert (jax.process_count(), jax.local_device_count()) == (2, 4)
  assert distributed.process_slice(5) == [slice(0, 3), slice(3, 5)][index]
  assert distributed.per_process(8, "train.batch_size") == 4

  # A batch as the stages split it: each process's block of rows, on the
  # loop's mesh, makes the global array.
  mesh = parallel.make_mesh({"data": -1})
  sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
  x_8x3 = np.arange(24, dtype=np.float32).reshape(8, 3)
  rows = distributed.process_slice(len(x_8x3))
  x = jax.make_array_from_process_local_data(sharding, x_8x3[rows])
  for shard in x.addressable_shards:  # each row where the batch has it
    np.testing.assert_array_equal(shard.data, x_8x3[shard.index])

  sum_sq_3 = jax.jit(lambda a: (a ** 2).sum(0),
                     out_shardings=NamedSharding(mesh, P()))(x)
  np.testing.assert_allclose(sum_sq_3, (x_8x3 ** 2).sum(0))
  psum_1x3 = jax.shard_map(lambda a: jax.lax.psum(a.sum(0, keepdims=True),
                                                  "data"),
                           mesh=mesh, in_specs=P("data"), out_specs=P())(x)
  np.testing.assert_allclose(psum_1x3, x_8x3.sum(0, keepdims=True))

  written = Path(shared_dir) / "written_by_main"
  result = distributed.write_on_main(written, lambda: written.write_text(str(index)))
  assert result == (1 if index == 0 else None)  # process 0 wrote 1 character
  assert written.read_text() == "0"  # every process sees it once past the call


if __name__ == "__main__":
  _worker(*sys.argv[1:])
