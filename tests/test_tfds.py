"""Prepared videos (TFDS, array_record): the decoder's frames, bad videos, reuse."""
import json

import numpy as np
from PIL import Image
import pytest

import conftest
from isr_dpo_jax import errors
from isr_dpo_jax.data import loader
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tfds_builder
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.data import video
from isr_dpo_jax.data import video_cache
from isr_dpo_jax.world import vocab

NUM_FRAMES, SIZE = 4, 32
GOOD = ("sample_demo_3.mp4", "sample_demo_9.mp4", "synthetic.mp4", "frames_a")
BAD = ("corrupt.mp4", "empty_folder", "missing.mp4")


pytestmark = conftest.needs_real_clips


def qa(record_id, video_path):
  return {"id": record_id, "video": video_path, "conversations": [
      {"from": "human", "value": f"<video>\nWhat happens in {record_id}?"},
      {"from": "gpt", "value": "Something. ✓"}]}


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  for clip in conftest.REAL_CLIPS:
    (root / clip.name).symlink_to(clip)
  rng = np.random.default_rng(0)
  scenes.write_mp4(rng.integers(0, 255, (6, 48, 40, 3), np.uint8),
                   root / "synthetic.mp4")
  scenes.write_frames(rng.integers(0, 255, (6, 40, 50, 3), np.uint8),
                      root / "frames_a")
  (root / "corrupt.mp4").write_bytes(
      b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
  (root / "empty_folder").mkdir()
  return root


@pytest.fixture(scope="module")
def files(video_root, tmp_path_factory):
  """A prompts file naming some videos twice and a test set."""
  tmp = tmp_path_factory.mktemp("jsonl")
  prompts = [qa(f"p{i}", name) for i, name in enumerate(GOOD + BAD)]
  prompts += [qa("again", GOOD[0]), {"id": "no video"}]
  test = [{**qa("t0", "frames_a"), "caption": "Noise."}]
  records.write_jsonl(tmp / "prompts.jsonl", prompts)
  records.write_jsonl(tmp / "test.jsonl", test)
  return tmp / "prompts.jsonl", tmp / "test.jsonl"


@pytest.fixture(scope="module")
def prepared_dir(video_root, files, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("prepared")
  video_cache.prepare(data_dir, files, video_root, NUM_FRAMES, SIZE,
                      num_threads=2)
  return data_dir


def test_prepared_frames_are_the_decoded_frames(video_root, prepared_dir):
  decoded = video_cache.Frames(video_root, NUM_FRAMES, SIZE)
  prepared = video_cache.Frames(video_root, NUM_FRAMES, SIZE, prepared_dir)
  assert len(prepared.prepared) == len(GOOD)
  for name in GOOD:
    frames = prepared(name)
    assert frames.dtype == np.uint8
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3)
    np.testing.assert_array_equal(frames, decoded(name))


def test_bad_videos_fail_as_when_decoded(video_root, prepared_dir):
  decoded = video_cache.Frames(video_root, NUM_FRAMES, SIZE)
  prepared = video_cache.Frames(video_root, NUM_FRAMES, SIZE, prepared_dir)
  for name in BAD:
    with pytest.raises(video.VideoError) as when_decoded:
      decoded(name)
    with pytest.raises(video.VideoError) as when_prepared:
      prepared(name)
    assert when_prepared.value.cause == when_decoded.value.cause
  with pytest.raises(video.VideoError, match=f"not among the videos prepared "
                     f"in {prepared_dir}"):
    prepared("never_named.mp4")


def test_bad_videos_are_logged_at_their_first_record(video_root, tmp_path,
                                                     caplog):
  prompts = tmp_path / "prompts.jsonl"
  records.write_jsonl(prompts, [qa("a", "frames_a"), qa("b", "corrupt.mp4"),
                                qa("c", "corrupt.mp4")])
  prepared = video_cache.prepare(tmp_path / "prepared", [prompts], video_root,
                                 NUM_FRAMES, SIZE)
  assert len(prepared) == 1 and set(prepared.bad) == {"corrupt.mp4"}
  skipped = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("skipped")]
  assert len(skipped) == 1
  assert skipped[0].startswith(f"skipped {prompts}:2: bad_video: ")
  assert "corrupt.mp4" in skipped[0]


def test_error_rate_bound_stops_the_build(video_root, files, tmp_path):
  with pytest.raises(records.TooManyBadRecords, match="bad_video"):
    video_cache.prepare(tmp_path, files, video_root, NUM_FRAMES, SIZE,
                        max_error_rate=0.2)


def test_written_once_as_array_record(video_root, files, prepared_dir):
  info = json.loads((prepared_dir / "video_frames" / "2.0.0" /
                     "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"
  (shard,) = (prepared_dir / "video_frames" / "2.0.0").glob("*.array_record*")
  written = shard.stat().st_mtime_ns
  video_cache.prepare(prepared_dir, files, video_root, NUM_FRAMES, SIZE)
  assert shard.stat().st_mtime_ns == written


def test_other_sizes_or_videos_are_one_clear_error(video_root, files,
                                                   prepared_dir, tmp_path):
  with pytest.raises(tfds_builder.PreparedMismatch, match=(
      "videos prepared as 4 frames of 32x32, but the model reads 8 frames "
      "of 32x32; prepare them for this model into another folder")):
    video_cache.Frames(video_root, 8, SIZE, prepared_dir)
  with pytest.raises(tfds_builder.PreparedMismatch,
                     match="no prepared videos there"):
    video_cache.Frames(video_root, NUM_FRAMES, SIZE, tmp_path)
  more = tmp_path / "more.jsonl"
  records.write_jsonl(more, [qa("new", "new.mp4")])
  with pytest.raises(tfds_builder.PreparedMismatch,
                     match="without 1 of these videos .first new.mp4."):
    video_cache.prepare(prepared_dir, [*files, more], video_root, NUM_FRAMES,
                        SIZE)


def test_loader_reads_prepared_frames(video_root, files, prepared_dir):
  tok = vocab.train_tokenizer([templates.VICUNA_SYSTEM, "What happens?"])
  encoder = tokenize.TextEncoder(tok, templates.get("vicuna_v1"),
                                 video_token_id=10_000, num_video_tokens=2)
  prompts, _ = files
  frames = video_cache.Frames(video_root, NUM_FRAMES, SIZE, prepared_dir)
  source = loader.JsonlSource(prompts, "qa", frames)
  assert source.frame_shape == (NUM_FRAMES, SIZE, SIZE, 3)
  batches = list(loader.Loader(source, "prompt", encoder, batch_size=4,
                               shuffle=False, process_index=0,
                               process_count=1, num_threads=2))
  rows = [(i, row) for batch in batches for i, row in zip(batch.ids,
                                                          batch.frames)]
  decoded = video_cache.Frames(video_root, NUM_FRAMES, SIZE)
  names = {f"p{i}": name for i, name in enumerate(GOOD)} | {"again": GOOD[0]}
  assert {i for i, _ in rows if i is not None} == set(names)
  for record_id, row in rows:
    if record_id is not None:
      np.testing.assert_array_equal(row, decoded(names[record_id]))
  errors = [e for batch in batches for e in batch.errors]
  # missing.mp4 is a bad record when read (not under the video root).
  assert sorted((e.line, e.reason) for e in errors) == [
      (5, "bad_video"), (6, "bad_video")]
  assert all(e.path == str(prompts) for e in errors)


def test_nothing_to_prepare_is_one_clear_error(video_root, tmp_path):
  empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
  records.write_jsonl(empty, [{"id": "no video"}])
  records.write_jsonl(broken, [qa("a", "corrupt.mp4")])
  with pytest.raises(errors.UserError, match="no record names a video"):
    video_cache.prepare(tmp_path / "a", [empty], video_root, NUM_FRAMES, SIZE)
  with pytest.raises(records.TooManyBadRecords,
                     match=r"(?s)1 of 1 records are bad .*corrupt.mp4"):
    video_cache.prepare(tmp_path / "b", [broken], video_root, NUM_FRAMES, SIZE)
