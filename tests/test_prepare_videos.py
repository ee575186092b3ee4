"""`isr-dpo prepare-videos`: the loop reads prepared frames, records unchanged."""
import pathlib

import pytest

import conftest
from isr_dpo_jax import cli
from isr_dpo_jax import iterate

SMOKE = str(conftest.CONFIGS / "smoke.py")
STAGE_FILES = ("responses.jsonl", "contexts.jsonl", "judgments.jsonl",
               "pairs.jsonl", "errors.jsonl")


def smoke_config(**overrides):
  return conftest.load_config("smoke", **{
      "iterations": 1, "data.prompts_per_iteration": 8, **overrides})


def prepare_videos(capsys, *flags) -> tuple[int, str, str]:
  """`isr-dpo prepare-videos` on the smoke config: (status, stdout, stderr)."""
  with pytest.raises(SystemExit) as exit_:
    cli.main(["isr-dpo", "prepare-videos", f"--config={SMOKE}", *flags])
  out, err = capsys.readouterr()
  return exit_.value.code or 0, out, err


def spoil_videos(video_root: pathlib.Path) -> int:
  """Overwrites every frame file, so that no video decodes any more."""
  files = [p for p in video_root.rglob("*") if p.is_file()]
  for path in files:
    path.write_bytes(b"not an image")
  return len(files)


def test_loop_on_prepared_videos_writes_the_same_records(tmp_path, capsys):
  baseline = tmp_path / "decoded"
  iterate.run(smoke_config(), baseline)
  run, frames = tmp_path / "prepared", tmp_path / "frames"
  status, out, _ = prepare_videos(capsys, f"--workdir={run}",
                                  f"--config.data.video_cache={frames}")
  # The world's 12 train and 8 test videos.
  assert status == 0 and "prepared 20 videos (0 undecodable)" in out
  # Decoding would now fail: every frame the run sees comes from the cache.
  assert spoil_videos(run / "world" / "videos")
  iterate.run(smoke_config(**{"data.video_cache": str(frames)}), run)
  for name in STAGE_FILES:
    expected = (baseline / "iter_0" / name).read_text()
    assert (run / "iter_0" / name).read_text() == expected, name


def test_the_command_needs_a_folder(tmp_path, capsys):
  status, _, err = prepare_videos(capsys, f"--workdir={tmp_path}")
  assert status == 2 and err.count("\n") == 1
  assert err.startswith("isr-dpo prepare-videos: error: data.video_cache is "
                        "empty: set --config.data.video_cache=<folder>")


def test_a_loop_on_videos_prepared_for_another_model_stops_at_once(
    tmp_path, capsys):
  frames = tmp_path / "frames"
  assert prepare_videos(capsys, f"--workdir={tmp_path / 'run'}",
                        f"--config.data.video_cache={frames}")[0] == 0
  with pytest.raises(SystemExit) as exit_:
    cli.main(["isr-dpo", "iterate", f"--config={SMOKE}",
              f"--workdir={tmp_path / 'other'}", "--config.world.size=40",
              f"--config.data.video_cache={frames}"])
  *progress, error = capsys.readouterr().err.splitlines()
  assert exit_.value.code == 2
  assert all(line.startswith("iteration 1/2: ") for line in progress), progress
  assert error == (f"isr-dpo iterate: error: {frames}: videos prepared as 8 "
                   "frames of 32x32, but the model reads 8 frames of 40x40; "
                   "prepare them for this model into another folder (isr-dpo "
                   "prepare-videos)")
  assert not (tmp_path / "other" / "iter_0" / "responses.jsonl").exists()
