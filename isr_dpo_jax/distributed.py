"""Multi-controller start-up: one JAX process per host (TPU) or per GPU.

`initialize` takes the process layout from the first of:

1. its arguments (the command-line flags);
2. ISR_DPO_COORDINATOR (or JAX's JAX_COORDINATOR_ADDRESS),
   ISR_DPO_NUM_PROCESSES, ISR_DPO_PROCESS_ID and, optionally,
   ISR_DPO_LOCAL_DEVICE_IDS (comma-separated): launch/local.sh sets them;
3. a cluster that JAX's own detection handles, values not given in 1-2 being
   left to it:
   - a Slurm job step with more than one task (srun). JAX takes the first host
     of SLURM_STEP_NODELIST as coordinator, a port derived from the job id
     (or JAX_COORDINATOR_PORT), and shows each process only the GPU numbered
     SLURM_LOCALID: start one task per GPU without binding GPUs to tasks;
   - an Open MPI job with more than one rank (mpirun). JAX reads the launcher
     address that Open MPI 4 (ORTE) publishes; Open MPI 5 does not, so there
     the coordinator must be given;
   - a Cloud TPU VM (libtpu installed and TPU chips attached): JAX asks the
     TPU metadata server for the workers, this worker's id and, in
     multislice, the slice layout;
4. otherwise a single process, and jax.distributed is not started.

Files with several processes: every process calls Orbax save and restore with
the same arguments on the same global arrays; Orbax writes each process's
shards, lets process 0 write the metadata and commit the step, and
synchronises the processes itself. Files that are not arrays (the jsonl
artifacts, summaries, the report) are written through `write_on_main`:
process 0 writes, and every process waits until it has.
"""
import dataclasses
import glob
import importlib.util
import logging
import math
import os
import socket
import threading

import jax
from jax.experimental import multihost_utils

ENV_COORDINATOR = "ISR_DPO_COORDINATOR"
ENV_NUM_PROCESSES = "ISR_DPO_NUM_PROCESSES"
ENV_PROCESS_ID = "ISR_DPO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ISR_DPO_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How this process joins the job; None values are left to JAX to detect."""
  source: str  # "explicit", "slurm", "ompi" or "tpu"
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def resolve_layout(coordinator=None, num_processes=None, process_id=None,
                   local_device_ids=None, environ=os.environ):
  """The Layout from arguments, our variables or the cluster; None if alone."""
  coordinator = (coordinator or environ.get(ENV_COORDINATOR)
                 or environ.get("JAX_COORDINATOR_ADDRESS"))
  num_processes = _int_or_env(num_processes, environ, ENV_NUM_PROCESSES)
  process_id = _int_or_env(process_id, environ, ENV_PROCESS_ID)
  if local_device_ids is None and environ.get(ENV_LOCAL_DEVICE_IDS):
    local_device_ids = environ[ENV_LOCAL_DEVICE_IDS].split(",")
  if local_device_ids is not None:
    local_device_ids = tuple(int(i) for i in local_device_ids)
  given = {"coordinator": coordinator, "num_processes": num_processes,
           "process_id": process_id}
  if None not in given.values():
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes})"
                       f" ({ENV_PROCESS_ID} / {ENV_NUM_PROCESSES} or flags).")
    return Layout("explicit", coordinator, num_processes, process_id,
                  local_device_ids)
  cluster = _detect_cluster(environ)
  if cluster is None:
    if all(v is None for v in given.values()):
      return None
    missing = ", ".join(k for k, v in given.items() if v is None)
    raise ValueError(
        f"Several processes need coordinator, num_processes and process_id "
        f"(flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID});"
        f" no Slurm, Open MPI or TPU cluster detected; missing: {missing}.")
  if (cluster == "ompi" and coordinator is None
      and "OMPI_MCA_orte_hnp_uri" not in environ):
    raise ValueError(
        "Open MPI 5 does not publish the launcher address that JAX uses as "
        f"coordinator: set {ENV_COORDINATOR}=host:port (a free port on the "
        "host of rank 0) for every rank.")
  return Layout(cluster, coordinator, num_processes, process_id,
                local_device_ids)


def initialize(coordinator=None, num_processes=None, process_id=None,
               local_device_ids=None, timeout_s=300):
  """Joins the multi-process job (see the module docstring); returns its Layout.

  Call it first, before anything touches a device. If the processes have not
  all joined within `timeout_s`, the process exits with status 1 after an
  error that names the coordinator and the process count: JAX would abort
  with a C++ check failure instead, later, and no Python exception can leave
  the blocked call.
  """
  layout = resolve_layout(coordinator, num_processes, process_id,
                          local_device_ids)
  if layout is None:
    logging.debug("Single process: jax.distributed not started.")
    return None
  joined = threading.Event()
  threading.Thread(target=_exit_unless_joined, args=(joined, layout, timeout_s),
                   name="distributed-init-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(
        layout.coordinator, layout.num_processes, layout.process_id,
        layout.local_device_ids,
        # A backstop only: the watchdog reports first, readably.
        initialization_timeout=2 * math.ceil(timeout_s))
  finally:
    joined.set()
  logging.info("Process %d of %d joined (%s layout).", jax.process_index(),
               jax.process_count(), layout.source)
  return layout


def is_main_process():
  """True on process 0, the one that writes the files that are not arrays."""
  return jax.process_index() == 0


def barrier(name):
  """Waits until every process reaches the barrier of the same `name`."""
  multihost_utils.sync_global_devices(name)


def write_on_main(path, write):
  """Process 0 calls `write()`, which writes `path`; every process then waits
  until it has, so that any may read `path` next. Every process must call
  it, in the same order. Returns what `write` returned on process 0, None
  on the others."""
  result = write() if is_main_process() else None
  barrier(f"write {path}")
  return result


def process_slice(num_items):
  """This process's contiguous block of `num_items` work items (array_split)."""
  per_process, rest = divmod(num_items, jax.process_count())
  index = jax.process_index()
  start = index * per_process + min(index, rest)
  return slice(start, start + per_process + (index < rest))


def per_process(batch_size, knob):
  """Each process's share of a global batch size (the config's `knob`)."""
  share, rest = divmod(batch_size, jax.process_count())
  if rest:
    raise ValueError(f"{knob}={batch_size} does not divide over "
                     f"{jax.process_count()} processes")
  return share


def _int_or_env(value, environ, name):
  if value is not None or not environ.get(name):
    return value
  try:
    return int(environ[name])
  except ValueError:
    raise ValueError(f"{name}={environ[name]!r} is not an integer.") from None


def _detect_cluster(environ):
  """The multi-process cluster that JAX can bootstrap from, or None."""
  if (int(environ.get("SLURM_NTASKS", "1")) > 1
      and "SLURM_STEP_NODELIST" in environ):
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if _on_cloud_tpu_vm():
    return "tpu"
  return None


def _on_cloud_tpu_vm():
  """libtpu and TPU chips (/dev/accel* up to v4, VFIO from v5) are present."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def _exit_unless_joined(joined, layout, timeout_s):
  if joined.wait(timeout_s):
    return
  logging.error(_join_failure(layout, timeout_s))
  os._exit(1)  # pylint: disable=protected-access


def _join_failure(layout, timeout_s):
  """Why the job did not form: the coordinator is down, or processes missing."""
  process_id = "?" if layout.process_id is None else layout.process_id
  count = layout.num_processes or f"the {layout.source} job's"
  who = f"Process {process_id} of {count} processes"
  if layout.coordinator is None:
    return (f"{who} did not join the coordinator that JAX derived from the "
            f"{layout.source} environment within {timeout_s:g} s.")
  if not _reachable(layout.coordinator):
    return (f"{who} could not reach the coordinator at {layout.coordinator} "
            f"within {timeout_s:g} s: is process 0 running, and do all "
            f"processes use this address ({ENV_COORDINATOR} or flag)?")
  return (f"{who}: the coordinator at {layout.coordinator} did not see all "
          f"{count} processes join within {timeout_s:g} s: were exactly "
          f"{count} processes started, with distinct ids and the same process "
          f"count ({ENV_NUM_PROCESSES} or flag)?")


def _reachable(address):
  host, port = address.rsplit(":", 1)
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
  except OSError:
    return False
  return True
