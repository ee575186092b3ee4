"""TFDS builder: round trip on real clips and frame folders, bad videos."""
import json
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from isr_dpo_jax.data import loader
from isr_dpo_jax.data import records
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tfds_builder
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.data import video
from isr_dpo_jax.data import vocab

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
NUM_FRAMES, SIZE = 4, 32


def qa(record_id, video_path):
  return {"id": record_id, "video": video_path, "conversations": [
      {"from": "human", "value": f"<video>\nWhat happens in {record_id}?"},
      {"from": "gpt", "value": "Something. ✓"}]}


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  for clip in sorted(VIDEOS.glob("*.mp4")):
    (root / clip.name).symlink_to(clip)
  rng = np.random.default_rng(0)
  folder = root / "frames_a"
  folder.mkdir()
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(
        folder / f"frame_{i}.png")
  (root / "corrupt.mp4").write_bytes(
      b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
  (root / "empty_folder").mkdir()
  return root


@pytest.fixture(scope="module")
def built(video_root, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tfds")
  clips = sorted(p.name for p in video_root.glob("sample_*.mp4"))
  train = [qa(f"clip{i}", name) for i, name in enumerate(clips)]
  train += [qa("frames", "frames_a"), qa("corrupt", "corrupt.mp4"),
            qa("empty", "empty_folder"), qa("gone", "missing.mp4")]
  test = [{**qa("t0", "frames_a"), "caption": "Noise."}]
  splits = {"train": tmp / "train.jsonl", "test": tmp / "test.jsonl"}
  records.write_jsonl(splits["train"], train)
  records.write_jsonl(splits["test"], test)
  builder = tfds_builder.VideoRecords(
      data_dir=tmp / "data", splits=splits, kind="qa", video_root=video_root,
      num_frames=NUM_FRAMES, frame_size=SIZE, num_threads=2)
  builder.download_and_prepare()
  return tmp / "data", builder, train, test


def test_round_trip_frames_and_text(built, video_root):
  data_dir, _, train, _ = built
  source = tfds_builder.Source(data_dir, "train")
  good = train[:len(train) - 3]
  assert len(source) == len(good)
  assert source.frame_shape == (NUM_FRAMES, SIZE, SIZE, 3)
  for i, written in enumerate(good):
    record, frames = source[i]
    assert record == written
    expected = video.resize_and_crop(
        video.read_video(video_root / written["video"], NUM_FRAMES), SIZE)
    assert frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, expected)


def test_bad_videos_are_skipped_and_counted(built):
  data_dir, builder, _, test = built
  report = builder.reports["train"]
  train_path = str(data_dir.parent / "train.jsonl")
  assert [(e.path, e.line, e.reason) for e in report.errors] == [
      (train_path, 6, "missing_video"), (train_path, 4, "bad_video"),
      (train_path, 5, "bad_video")]
  assert "corrupt.mp4" in report.errors[1].detail
  assert "empty_folder" in report.errors[2].detail
  record, _ = tfds_builder.Source(data_dir, "test")[0]
  assert record == test[0]


def test_error_rate_bound_stops_the_build(built, video_root, tmp_path):
  data_dir, _, _, _ = built
  with pytest.raises(records.TooManyBadRecords, match="bad_video"):
    tfds_builder.VideoRecords(
        data_dir=tmp_path, splits={"train": data_dir.parent / "train.jsonl"},
        kind="qa", video_root=video_root, num_frames=NUM_FRAMES,
        frame_size=SIZE, max_error_rate=0.2).download_and_prepare()


def test_written_as_array_record(built):
  data_dir, _, _, _ = built
  info = json.loads((data_dir / "video_records" / "1.0.0" /
                     "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"


def test_loader_reads_the_built_split(built):
  data_dir, _, train, _ = built
  tok = vocab.train_tokenizer([templates.VICUNA_SYSTEM, "What happens?"])
  encoder = tokenize.TextEncoder(tok, templates.get("vicuna_v1"),
                                 video_token_id=10_000, num_video_tokens=2)
  source = tfds_builder.Source(data_dir, "train")
  (batch,) = list(loader.Loader(source, "prompt", encoder, batch_size=4,
                                shuffle=False, process_index=0,
                                process_count=1, num_threads=2))
  assert batch.ids == [r["id"] for r in train[:3]] + [None]
  for row in range(3):
    np.testing.assert_array_equal(batch.frames[row], source[row][1])
    prompt = batch.text.prompt_ids[row][batch.text.prompt_mask[row]]
    np.testing.assert_array_equal(
        prompt, encoder.prompt(train[row]["conversations"][0]["value"]))
