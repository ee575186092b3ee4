"""Launch scripts: syntax, shellcheck, dry runs, local.sh's process control.

gcloud and git are replaced by stubs that record their arguments, so nothing
here touches a cloud; the real multi-process run is in test_distributed.py.
"""
import os
from pathlib import Path
import shlex
import shutil
import subprocess

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = [LAUNCH / name
           for name in ("local.sh", "tpu_vm.sh", "gpu_slurm.sbatch")]
COMMAND = ["isr-dpo", "iterate", "--config=configs/smoke.py",
           "--config.mesh={'data': -1, 'fsdp': 1}"]


@pytest.fixture(scope="module")
def shellcheck():
  """Debian's shellcheck, installed with apt-get if it is missing."""
  if not shutil.which("shellcheck") and shutil.which("apt-get"):
    apt_get = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    install = [*apt_get, "install", "-y", "-q", "shellcheck"]
    if subprocess.run(install, capture_output=True, check=False).returncode:
      subprocess.run([*apt_get, "update", "-q"], capture_output=True,
                     check=False)
      subprocess.run(install, capture_output=True, check=False)
  path = shutil.which("shellcheck")
  if path is None:
    pytest.skip("shellcheck is not installed and apt-get could not install it")
  return path


@pytest.fixture
def stub_bin(tmp_path):
  """A PATH dir whose gcloud and git log their arguments to calls.log.

  `gcloud ... describe` exits with $DESCRIBE_STATUS (1: no such TPU VM).
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  for tool in ("gcloud", "git"):
    stub = bin_dir / tool
    stub.write_text(f"""#!/usr/bin/env bash
printf '%s\\0' {tool} "$@" >>{log}
echo >>{log}
[[ " $* " != *' describe '* ]] || exit "${{DESCRIBE_STATUS:-1}}"
""")
    stub.chmod(0o755)
  return bin_dir


def _calls(stub_bin):
  log = stub_bin.parent / "calls.log"
  if not log.exists():
    return []
  return [line.strip("\0").split("\0")
          for line in log.read_text().splitlines() if line.strip("\0")]


def _run(args, env=None, **kwargs):
  return subprocess.run(args, env={**os.environ, **(env or {})}, text=True,
                        capture_output=True, timeout=60, **kwargs)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
  result = _run(["bash", "-n", str(script)])
  assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck(shellcheck):
  result = _run([shellcheck, *map(str, SCRIPTS)])
  assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_for_a_v4_32_slice(stub_bin):
  result = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--name", "isr",
                 "--zone", "us-central2-b", "--project", "proj", "--",
                 *COMMAND], env={"PATH": f"{stub_bin}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  assert not _calls(stub_bin), "a dry run must not run gcloud or git"
  create, archive, scp, install, run = map(shlex.split,
                                           result.stdout.splitlines())
  where = ["--zone=us-central2-b", "--project=proj"]
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert create == [*tpu_vm, "create", "isr", *where,
                    "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base"]
  assert archive[:2] == ["git", "-C"] and archive[-1] == "HEAD"
  tarball = archive[-2].removeprefix("--output=")
  assert scp == [*tpu_vm, "scp", tarball, "isr:isr_dpo_jax.tar.gz",
                 "--worker=all", *where]
  assert install[:-1] == [*tpu_vm, "ssh", "isr", "--worker=all", *where]
  assert 'pip install -q -e "$HOME/isr_dpo_jax[tpu]"' in install[-1]
  assert run[:-1] == install[:-1]
  remote = shlex.split(run[-1].removeprefix("--command="))
  assert remote[:4] == ["cd", "$HOME/isr_dpo_jax", "&&",
                        "PATH=$HOME/isr_dpo_venv/bin:$PATH"]
  assert remote[4:] == ["JAX_PLATFORMS=tpu", *COMMAND]


@pytest.mark.parametrize("describe_status, creates", [(0, False), (1, True)])
def test_tpu_vm_reuses_an_existing_slice(stub_bin, describe_status, creates):
  result = _run([str(LAUNCH / "tpu_vm.sh"), "--skip-setup", "--name", "isr",
                 "--zone", "z", "--", "true"],
                env={"PATH": f"{stub_bin}:{os.environ['PATH']}",
                     "DESCRIBE_STATUS": str(describe_status)})
  assert result.returncode == 0, result.stderr
  verbs = [call[4] for call in _calls(stub_bin)]
  assert verbs == ["describe", *(["create"] if creates else []), "ssh"]


def test_gpu_slurm_dry_run_for_2_nodes_of_8_gpus(tmp_path):
  script = LAUNCH / "gpu_slurm.sbatch"
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run(["bash", str(script), *COMMAND], text=True,
                          capture_output=True, timeout=60, cwd=tmp_path,
                          env={**env, "DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == [
      "srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
      "--kill-on-bad-exit=1", *COMMAND]
  header = [line for line in script.read_text().splitlines()
            if line.startswith("#SBATCH")]
  assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
          "#SBATCH --gpus-per-node=8"} <= set(header)


def test_local_sh_dry_run_sets_each_process_apart():
  result = _run([str(LAUNCH / "local.sh"), "2", "--devices", "4", "--dry-run",
                 "--", *COMMAND],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                  "--xla_dump_to=/tmp/x"})
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(lines) == 2
  coordinators = set()
  for process_id, words in enumerate(lines):
    assert words[0] == "env" and words[-len(COMMAND):] == COMMAND
    env = dict(w.split("=", 1) for w in words[1:-len(COMMAND)])
    assert env["ISR_DPO_PROCESS_ID"] == str(process_id)
    assert env["ISR_DPO_NUM_PROCESSES"] == "2"
    assert env["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4"]
    coordinators.add(env["ISR_DPO_COORDINATOR"])
  assert len(coordinators) == 1


def test_local_sh_writes_a_log_per_process(tmp_path):
  result = _run([str(LAUNCH / "local.sh"), "3", "--log-dir", str(tmp_path),
                 "--", "bash", "-c",
                 "echo $ISR_DPO_PROCESS_ID of $ISR_DPO_NUM_PROCESSES"])
  assert result.returncode == 0, result.stderr
  for i in range(3):
    assert (tmp_path / f"process_{i}.log").read_text() == f"{i} of 3\n"


def test_local_sh_stops_all_when_one_fails(tmp_path):
  """Process 1 fails: the status is its own, process 0 and its child die."""
  job = tmp_path / "job.sh"
  job.write_text(f"""
if [ "$ISR_DPO_PROCESS_ID" = 1 ]; then
  until [ -s {tmp_path}/child ]; do sleep 0.1; done
  exit 3
fi
echo $$ >{tmp_path}/parent
sleep 60 &
echo $! >{tmp_path}/child.tmp && mv {tmp_path}/child.tmp {tmp_path}/child
wait
""")
  result = _run([str(LAUNCH / "local.sh"), "2", "--log-dir",
                 str(tmp_path / "logs"), "--", "bash", str(job)])
  assert result.returncode == 3, result.stderr
  for name in ("parent", "child"):
    assert not _alive(int((tmp_path / name).read_text())), name


def _alive(pid):
  """True for a running process; a zombie (no reaper in a container) is dead."""
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state != "Z"
