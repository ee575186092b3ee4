"""The `isr-dpo` command: `isr-dpo <command> --config=<file.py> --workdir=<dir>`.

Every command takes an ml_collections config file and overrides of any of its
fields (`--config.dpo.beta=0.2`; `--config.world=None` switches the synthetic
world off), as big_vision's trainers do. The config is checked whole
(settings.validate) before the command's module is imported, so a bad value
stops the run before any work. A user error (errors.UserError: a bad flag or
config value, a missing file, too many bad records, a checkpoint that does not
restore) ends as one line on stderr and exit status 2; `--verbose` or
ISR_DPO_VERBOSE=1 shows its traceback.
"""
import ast
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import logging
import operator
import os
import re
import sys
import traceback

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from isr_dpo_jax import errors
from isr_dpo_jax import settings

# command -> (module, what it does); each module has `main(config, workdir)`.
COMMANDS = {
    "iterate": ("isr_dpo_jax.iterate", "run ISR-DPO iterations"),
    "sft": ("isr_dpo_jax.sft", "supervised fine-tuning on instruction data"),
    "eval": ("isr_dpo_jax.evaluate", "VideoQA evaluation of a checkpoint"),
    "demo": ("isr_dpo_jax.demo", "the built-in synthetic-world experiment"),
    "plan": ("isr_dpo_jax.plan", "compile a run for a TPU slice: memory, time"),
    "prepare-videos": ("isr_dpo_jax.prepare_videos",
                       "decode the run's videos once (data.video_cache)"),
}
DEFAULT_CONFIGS = {"demo": "configs/demo.py"}
_PROMPTS = (
    ("world", "the built-in synthetic world; None: your own data (below)"),
    ("model.checkpoint", "pi_0's checkpoint directory (model.family's layout)"),
    ("data.prompts", "QA jsonl of the (video, question) prompts"),
    ("data.video_root", "the folder the records' video paths start from"),
)
# Each command's main config keys, which `isr-dpo <command> --help` shows with
# their values in the config that the command would run.
KNOBS = {
    "iterate": (
        ("iterations", "ISR-DPO iterations T"),
        *_PROMPTS,
        ("data.prompts_per_iteration", "prompts per iteration; 0: all of them"),
        ("self_judge.mode", "the loop's judge: likelihood, generative, ground_truth"),
        ("self_judge.threshold", "least averaged P(winner) of a kept pair"),
        ("dpo.beta", "DPO's beta: the pull toward the reference"),
        ("dpo.reference", "previous (pi_t) or initial (pi_0)"),
        ("train.learning_rate", "DPO's learning rate"),
        ("train.epochs", "DPO epochs over each iteration's pairs"),
        ("train.lora.rank", "LoRA adapters' rank; 0: full fine-tuning"),
        ("eval.enabled", "evaluate pi_t at the start of each iteration"),
        ("mesh", "device mesh axes' sizes; -1: the remaining devices"),
    ),
    "sft": (
        ("model.checkpoint", "the checkpoint directory to fine-tune"),
        ("sft.data", "instruction jsonl (QA and caption conversations)"),
        ("data.video_root", "the folder the records' video paths start from"),
        ("sft.epochs", "epochs over sft.data"),
        ("sft.learning_rate", "peak learning rate"),
        ("sft.batch_size", "examples per step, over all devices"),
        ("sft.frozen", "parameter groups (or regexes) not trained"),
    ),
    "eval": (
        ("model.checkpoint", "the checkpoint directory to evaluate"),
        ("eval.params_dir", "a saved policy (iter_<t>/policy); '': the checkpoint's"),
        ("eval.test_sets", "test sets to answer"),
        ("eval.test_root", "the folder of {name}.qa.jsonl test files"),
        ("eval.scoring", "judge (an LLM endpoint) or match (exact match)"),
        ("eval.judge.model", "the evaluation judge's model name"),
        ("eval.judge.base_url", "its endpoint; None: OPENAI_BASE_URL"),
    ),
    "demo": (
        ("iterations", "ISR-DPO iterations of each arm"),
        ("seed", "seeds the loop (the world and pi_0 stay those of world.seed)"),
        ("demo.pi0", "pi_0 of every arm; --stage=sft trains it"),
        ("demo.loop_clips", "training clips whose questions the loop asks"),
        ("data.prompts_per_iteration", "of those questions, per iteration"),
        ("self_judge.mode", "the loop's judge: likelihood, generative, ground_truth"),
        ("train.learning_rate", "DPO's learning rate"),
    ),
    "plan": (
        ("mesh", "device mesh axes' sizes; -1: the remaining devices"),
        ("model.dtype", "compute dtype (parameters stay float32)"),
        ("train.batch_size", "DPO pairs per step, over all devices"),
        ("train.grad_accum_steps", "micro-batches per step"),
        ("train.remat", "rematerialisation policy; None: none"),
        ("data.max_length", "longest tokenised example"),
    ),
    "prepare-videos": (
        *_PROMPTS,
        ("data.video_cache", "where the decoded videos go"),
        ("eval.test_sets", "test sets whose videos are prepared too"),
        ("eval.test_root", "the folder of {name}.qa.jsonl test files"),
    ),
}
# Errors that the user fixes: one line, exit status 2. A missing file's
# message names the file.
USER_ERRORS = (errors.UserError, FileNotFoundError)
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)")
_HELP = ("-h", "--help", "--helpshort", "--helpfull")


class _SubConfigParser(flags.ArgumentParser):
  """A sub-config's override: a dict literal, or None to switch it off."""

  def parse(self, argument):
    if not isinstance(argument, str):  # the config's own value
      return argument
    try:
      value = ast.literal_eval(argument)
    except (SyntaxError, ValueError):
      value = argument
    if value is None:
      return None
    if isinstance(value, dict):
      return ml_collections.ConfigDict(value)
    raise ValueError(f"{argument!r} is neither None nor a dict")

  def flag_type(self):
    return "config dict or None"


config_flags.register_flag_parser_for_type(ml_collections.ConfigDict,
                                           _SubConfigParser())


@dataclasses.dataclass(frozen=True)
class Invocation:
  """What the command line asks for, its config checked."""
  command: str
  config: ml_collections.ConfigDict
  workdir: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  options: dict = dataclasses.field(default_factory=dict)  # the command's own


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: isr-dpo <command> --config=<file.py> --workdir=<dir> "
           "[--config.<key>=<value> ...]", "", "commands:"]
  lines += [f"  {name:{width}s}  {doc}" for name, (_, doc) in COMMANDS.items()]
  lines += ["", "isr-dpo <command> --help: the command's flags and main config keys"]
  return "\n".join(lines)


def _help(command: str, fv: flags.FlagValues, overrides: list[str],
          program: str) -> str:
  """The command's flags, and its main config keys (KNOBS) with their values
  in the config it would run: --config's with the overrides, or defaults.py's."""
  if fv.config is None:
    from isr_dpo_jax import defaults  # pylint: disable=g-import-not-at-top
    config, source = defaults.get_config(), "isr_dpo_jax/defaults.py"
  else:
    config, source = load_config(fv.config), fv.config
  config = _with_overrides(config, overrides, program)
  known = set(settings.keys(config))
  value_of = lambda key: functools.reduce(operator.getitem, key.split("."), config)
  knobs = [(f"{key}={_short(value_of(key))}", doc)
           for key, doc in KNOBS[command] if key in known]
  flag_lines = [(f"--{name}", fv[name].help + (
      f" (default: {fv[name].default})" if fv[name].default else ""))
                for name in fv]
  width = max(len(left) for left, _ in flag_lines + knobs if len(left) <= 36)
  row = lambda left, doc: (f"  {left:{width}s}  {doc}" if len(left) <= width
                           else f"  {left}\n  {'':{width}s}  {doc}")
  return "\n".join([
      f"usage: isr-dpo {command} --config=<file.py> --workdir=<dir> "
      "[--config.<key>=<value> ...]", "", COMMANDS[command][1], "", "flags:",
      *(row(*line) for line in flag_lines), "",
      f"main config keys (--config.<key>=<value>; values of {source}):",
      *(row(*knob) for knob in knobs)])


def _short(value) -> str:
  """A config value in 40 characters at most; a long sub-config by its keys."""
  sub = isinstance(value, ml_collections.ConfigDict)
  text = repr(value.to_dict() if sub else value)
  if sub and len(text) > 40:
    text = "{" + ", ".join(value) + "}"
  return text if len(text) <= 40 else text[:37] + "..."


def _flags(command: str) -> flags.FlagValues:
  """The command's own flags, in a FlagValues of their own."""
  fv = flags.FlagValues()
  flags.DEFINE_string("config", DEFAULT_CONFIGS.get(command),
                      "experiment config (.py)", flag_values=fv)
  flags.DEFINE_string("workdir", None, "where the run writes everything",
                      flag_values=fv)
  # Multi-process jobs; without these, distributed.initialize reads the
  # environment (launch/local.sh, Slurm, Open MPI, a TPU VM).
  flags.DEFINE_string("coordinator", None, "host:port of process 0", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes in the job", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
  flags.DEFINE_bool("verbose", False, "tracebacks for user errors too "
                    "(or ISR_DPO_VERBOSE=1)", flag_values=fv)
  if command == "demo":
    flags.DEFINE_enum("stage", "loop", ["loop", "sft"],
                      "loop: the arms from the shipped pi_0; sft: train that "
                      "pi_0 (about 80 minutes on 2 cores)", flag_values=fv)
  if command == "plan":
    flags.DEFINE_string("topology", None, "the TPU slice or GPU hosts to "
                        "plan for, <chip>:<shape> (e.g. v5p:2x2x2, h100:8); "
                        "default: this host's devices", flag_values=fv)
  return fv


def parse(argv: list[str]) -> Invocation:
  """The command, its flags and its checked config; a UserError if one is wrong."""
  if len(argv) < 2:
    print(_usage(), file=sys.stderr)
    sys.exit(2)
  if argv[1] in _HELP:
    print(_usage())
    sys.exit(0)
  command = argv[1]
  if command not in COMMANDS:
    nearest = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"; did you mean {nearest[0]}?" if nearest else ""
    raise errors.UserError(f"no command {command!r}{hint} "
                           f"(commands: {', '.join(COMMANDS)})")
  fv = _flags(command)
  overrides = [arg for arg in argv[2:] if _OVERRIDE.match(arg)]
  rest = [arg for arg in argv[2:] if not _OVERRIDE.match(arg)]
  wants_help = any(arg in _HELP for arg in rest)
  rest = [arg for arg in rest if arg not in _HELP]
  try:
    absl_args = fv([argv[0]] + rest, known_only=True)
    flags.FLAGS(absl_args)  # what remains must be absl's (--verbosity, ...)
  except flags.UnrecognizedFlagError as e:
    nearest = difflib.get_close_matches(e.flagname, list(fv), n=1)
    hint = f"; did you mean --{nearest[0]}?" if nearest else ""
    raise errors.UserError(f"--{e.flagname}: no such flag{hint}") from e
  except flags.Error as e:
    raise errors.UserError(str(e)) from e
  if wants_help:
    print(_help(command, fv, overrides, argv[0]))
    sys.exit(0)
  if fv.config is None or (fv.workdir is None and command != "plan"):
    raise errors.UserError(f"--config and --workdir are required: isr-dpo "
                           f"{command} --config=<file.py> --workdir=<dir>")
  config = _with_overrides(load_config(fv.config), overrides, argv[0])
  settings.validate(config, command)
  options = ({"topology": fv.topology} if command == "plan" else
             {"stage": fv.stage} if command == "demo" else {})
  return Invocation(command, config, fv.workdir, fv.coordinator,
                    fv.num_processes, fv.process_id, options)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file ("file.py" or "file.py:argument")."""
  path, _, argument = spec.partition(":")
  if not os.path.isfile(path):
    raise settings.ConfigError(f"--config={spec}: no such config file")
  module_spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(*([argument] if argument else []))
  except Exception as e:  # the config file's own error, however it fails
    raise settings.ConfigError(
        f"{path}:{_line_in(path, e)}: {type(e).__name__}: {e}") from e


def _line_in(path: str, error: Exception) -> int | str:
  """The line of `path` where `error` was raised (or a SyntaxError found)."""
  if isinstance(error, SyntaxError) and error.filename == path:
    return error.lineno
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return lines[-1] if lines else "?"


def _with_overrides(config: ml_collections.ConfigDict, overrides: list[str],
                    program: str) -> ml_collections.ConfigDict:
  """`config` with `--config.a.b=value` overrides applied (and locked)."""
  known = set(settings.keys(config))
  for arg in overrides:
    key = _OVERRIDE.match(arg)[2]
    if key not in known:
      raise settings.unknown_key(config, key)
  fv = flags.FlagValues()
  try:
    holder = config_flags.DEFINE_config_dict(
        "config", config, flag_values=fv, sys_argv=[program] + overrides)
    fv([program] + overrides)
  except flags.Error as e:
    raise settings.ConfigError(str(e)) from e
  return holder.value


def _run(invocation: Invocation) -> None:
  # jax comes in here, once the config is known to be good.
  from isr_dpo_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(invocation.coordinator, invocation.num_processes,
                         invocation.process_id)
  module = importlib.import_module(COMMANDS[invocation.command][0])
  module.main(invocation.config, invocation.workdir, **invocation.options)


def _quiet_start_up() -> None:
  """Silences what every run would print before its work, and no warning.

  transformers advises that PyTorch is absent (the models here are JAX; its
  advisories, and only they, obey TRANSFORMERS_NO_ADVISORY_WARNINGS); JAX
  logs at INFO each backend it probes and does not find (a TPU on a GPU or CPU
  host). JAX_LOGGING_LEVEL, read when jax is imported later, still sets the
  level of JAX's logs.
  """
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  logging.getLogger("jax").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  _quiet_start_up()
  verbose = "--verbose" in argv or os.environ.get("ISR_DPO_VERBOSE") == "1"
  try:
    app.run(_run, argv=argv, flags_parser=parse)
  except USER_ERRORS as error:
    if verbose:
      raise
    program = " ".join(["isr-dpo"] + [a for a in argv[1:2] if a in COMMANDS])
    message = " ".join(str(error).split())  # one line, whatever it holds
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
