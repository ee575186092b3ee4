"""The `isr-dpo` command: `isr-dpo <command> --config=<file.py> --workdir=<dir>`.

Every command takes an ml_collections config file and overrides of any of its
fields (`--config.dpo.beta=0.2`), as big_vision's trainers do.
"""
import importlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from isr_dpo_jax import distributed

# command -> (module, what it does); each module has `main(config, workdir)`.
COMMANDS = {
    "iterate": ("isr_dpo_jax.iterate", "run ISR-DPO iterations"),
    "sft": ("isr_dpo_jax.sft", "supervised fine-tuning on instruction data"),
    "eval": ("isr_dpo_jax.evaluate", "VideoQA evaluation of a checkpoint"),
    "demo": ("isr_dpo_jax.demo", "the built-in synthetic-world experiment"),
}
DEFAULT_CONFIGS = {"demo": "configs/demo.py"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run writes everything")
# Multi-process jobs; without these, distributed.initialize reads the
# environment (launch/local.sh, Slurm, Open MPI, a TPU VM).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def _usage() -> str:
  lines = ["usage: isr-dpo <command> --config=<file.py> --workdir=<dir> [--config.x=y]"]
  lines += [f"  {name:8s} {doc}" for name, (_, doc) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise SystemExit(_usage())
  command = argv[1]
  module = importlib.import_module(COMMANDS[command][0])
  rest = argv[2:]
  if command in DEFAULT_CONFIGS and not any(a.startswith("--config=") for a in rest):
    rest = [f"--config={DEFAULT_CONFIGS[command]}"] + rest

  def run(_):
    if _CONFIG.value is None or _WORKDIR.value is None:
      raise app.UsageError("--config and --workdir are required\n" + _usage())
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    module.main(_CONFIG.value, _WORKDIR.value)

  app.run(run, argv=[f"isr-dpo {command}"] + rest)


if __name__ == "__main__":
  main()
