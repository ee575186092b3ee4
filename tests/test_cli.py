"""The `isr-dpo` command line: user errors are one line and exit status 2,
found before any work; the synthetic world switches off from the command line."""
import os
import subprocess
import sys
import types

import pytest

import conftest
from isr_dpo_jax import cli
from isr_dpo_jax import settings
from isr_dpo_jax.data import records

SMOKE = str(conftest.CONFIGS / "smoke.py")


def _fails(argv, capsys) -> str:
  """The one stderr line of a command that must exit with status 2."""
  with pytest.raises(SystemExit) as exit_:
    cli.main(["isr-dpo", *argv])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  return err


@pytest.mark.parametrize("override, message", [
    ("--config.self_judge.mode=bogus",
     "self_judge.mode='bogus': must be one of likelihood, generative, ground_truth"),
    ("--config.dpo.loss_type=sigmod", "did you mean 'sigmoid'?"),
    ("--config.dpo.betta=0.2", "dpo.betta: no such config key; did you mean dpo.beta?"),
    ("--config.dpo.beta=abc", "--config.dpo.beta=abc"),
    ("--config.dpo.beta=-1", "dpo.beta=-1.0: must be a number > 0"),
    ("--config.train.grad_accum_steps=3", "does not divide train.batch_size=8"),
    ("--config.data.prompts=/no/such/prompts.jsonl", "data.prompts='/no/such/prompts.jsonl'"),
    ("--workdirr=x", "--workdirr: no such flag; did you mean --workdir?"),
])
def test_a_bad_value_is_one_line_before_any_work(override, message, tmp_path, capsys):
  err = _fails(["iterate", f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
                override], capsys)
  assert err.startswith("isr-dpo iterate: error: ") and message in err
  assert not (tmp_path / "w").exists()  # nothing started


def test_a_config_file_that_does_not_exist(tmp_path, capsys):
  err = _fails(["sft", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}"],
               capsys)
  assert f"--config={tmp_path / 'nope.py'}: no such config file" in err


def test_a_config_file_that_fails_names_its_line(tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text("def get_config():\n  return undefined_name\n")
  err = _fails(["sft", f"--config={path}", f"--workdir={tmp_path}"], capsys)
  assert f"{path}:2: NameError:" in err


def test_an_unknown_command(capsys):
  assert "did you mean iterate?" in _fails(["iterat"], capsys)


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
  monkeypatch.setenv("ISR_DPO_VERBOSE", "1")
  with pytest.raises(settings.ConfigError, match="did you mean dpo.beta"):
    cli.main(["isr-dpo", "iterate", f"--config={SMOKE}", f"--workdir={tmp_path}",
              "--config.dpo.betta=0.2"])


@pytest.mark.parametrize("error", [
    records.TooManyBadRecords("prompts.jsonl: 3 of 4 records are bad"),
    FileNotFoundError("checkpoints/pi_0: no config.json"),
])
def test_a_user_error_at_run_time_is_one_line(error, tmp_path, monkeypatch, capsys):
  def main(config, workdir):
    raise error

  monkeypatch.setitem(sys.modules, "failing_command", types.SimpleNamespace(main=main))
  monkeypatch.setitem(cli.COMMANDS, "iterate", ("failing_command", "fails"))
  err = _fails(["iterate", f"--config={SMOKE}", f"--workdir={tmp_path}"], capsys)
  assert str(error) in err


def test_a_video_root_beside_the_synthetic_world_says_what_to_do(tmp_path, capsys):
  err = _fails(["iterate", f"--config={SMOKE}", f"--workdir={tmp_path}",
                f"--config.data.video_root={tmp_path}"], capsys)
  assert "config.world makes the synthetic world" in err
  assert "--config.world=None" in err


def test_the_world_switches_off_on_the_command_line(tmp_path, capsys):
  for name in ("checkpoint", "videos"):
    (tmp_path / name).mkdir()
  (tmp_path / "prompts.jsonl").write_text("")
  own_data = [f"--config.model.checkpoint={tmp_path / 'checkpoint'}",
              f"--config.data.prompts={tmp_path / 'prompts.jsonl'}"]
  invocation = cli.parse(["isr-dpo", "iterate", f"--config={SMOKE}",
                          f"--workdir={tmp_path}", "--config.world=None",
                          f"--config.data.video_root={tmp_path / 'videos'}",
                          *own_data])
  assert invocation.config.world is None
  assert invocation.config.data.video_root == str(tmp_path / "videos")
  # Without a world, the run's own inputs are required.
  err = _fails(["iterate", f"--config={SMOKE}", f"--workdir={tmp_path}",
                "--config.world=None", *own_data], capsys)
  assert "data.video_root is empty" in err
  err = _fails(["demo", f"--workdir={tmp_path}", "--config.world=None"], capsys)
  assert "the demo runs on the synthetic world" in err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_a_command_s_help_lists_its_flags_and_main_keys(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["isr-dpo", command, "--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  for name in cli._flags(command):
    assert f"  --{name} " in out
  config = cli.load_config(cli.DEFAULT_CONFIGS.get(command, SMOKE))
  known = set(settings.keys(config))
  for key, meaning in cli.KNOBS[command]:
    assert key in known  # a renamed key is renamed here too
    assert f"  {key}=" in out and meaning in out


def test_help_shows_the_values_of_the_config_and_its_overrides(capsys):
  with pytest.raises(SystemExit):
    cli.main(["isr-dpo", "iterate", f"--config={SMOKE}", "--config.dpo.beta=0.25",
              "--help"])
  out = capsys.readouterr().out
  assert f"values of {SMOKE}" in out
  assert "  iterations=2 " in out and "  dpo.beta=0.25 " in out


def test_the_command_list_lines_up(capsys):
  with pytest.raises(SystemExit):
    cli.main(["isr-dpo", "--help"])
  rows = [line for line in capsys.readouterr().out.splitlines()
          if line.split() and line.split()[0] in cli.COMMANDS]
  assert len(rows) == len(cli.COMMANDS)
  starts = {line.index(doc) for line, (_, doc) in zip(rows, cli.COMMANDS.values())}
  assert len(starts) == 1, rows


def test_a_single_process_run_starts_without_noise(tmp_path):
  """What a smoke run prints before its work: no advice that PyTorch is absent
  (hidden here, as on a JAX-only host), no probe of a TPU (JAX chooses its
  backend), no word that jax.distributed did not start; JAX's warnings stay."""
  script = ("import logging, sys\n"
            "sys.modules['torch'] = None\n"
            "from isr_dpo_jax import cli\n"
            "try:\n"
            "  cli.main(['isr-dpo', *sys.argv[1:]])\n"
            "finally:\n"
            "  logging.getLogger('jax._src.xla_bridge').warning('a real warning')\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = subprocess.run([sys.executable, "-c", script, "iterate", f"--config={SMOKE}",
                        f"--workdir={tmp_path}", "--config.iterations=0"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  for noise in ("PyTorch was not found", "Unable to initialize backend",
                "jax.distributed not started"):
    assert noise not in run.stderr, run.stderr[-3000:]
  assert "a real warning" in run.stderr


def test_demo_stage_picks_the_loop_or_the_pi0_recipe(tmp_path, capsys):
  base = ["isr-dpo", "demo", f"--workdir={tmp_path}"]
  assert cli.parse(base).options == {"stage": "loop"}
  assert cli.parse(base + ["--stage=sft"]).options == {"stage": "sft"}
  err = _fails(["demo", f"--workdir={tmp_path}", "--stage=rlhf"], capsys)
  assert "--stage" in err and "sft" in err
