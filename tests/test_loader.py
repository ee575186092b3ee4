"""Grain loader: host shards, seeded shuffling, exact resume, batch contents."""
import numpy as np
from PIL import Image
import pytest

from isr_dpo_jax.data import batching
from isr_dpo_jax.data import loader
from isr_dpo_jax.data import records
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.data import video
from isr_dpo_jax.data import video_cache
from isr_dpo_jax.world import vocab

NUM_RECORDS, BATCH = 11, 4
FRAME_SHAPE = (2, 8, 8, 3)
NUM_VIDEO = 3


class MemorySource:
  """DPO records whose frames are filled with the record's index."""
  frame_shape = FRAME_SHAPE

  def __init__(self, num_records):
    self.records = [
        {"id": f"r{i}", "video": f"v{i}", "prompt": f"<video>\nWhat is {i}?",
         "chosen": "The man is riding." * (1 + i % 3), "rejected": "No."}
        for i in range(num_records)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i], np.full(FRAME_SHAPE, i, np.uint8)

  def locate(self, i):
    return "memory", i + 1


@pytest.fixture(scope="module")
def encoder():
  tok = vocab.train_tokenizer(
      [templates.VICUNA_SYSTEM, "What is the man riding? No."], vocab_size=320)
  return tokenize.TextEncoder(tok, templates.get("vicuna_v1"),
                              video_token_id=10_000,
                              num_video_tokens=NUM_VIDEO, max_length=512,
                              min_response_tokens=4)


def make(encoder, source=None, task="preference", **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return loader.Loader(source or MemorySource(NUM_RECORDS), task, encoder,
                       BATCH, num_threads=2, **kwargs)


def ids(batches):
  return [i for b in batches for i in b.ids if i is not None]


def test_batches_hold_the_encoded_records_and_their_frames(encoder):
  source = MemorySource(NUM_RECORDS)
  batches = list(make(encoder, source, shuffle=False))
  assert len(batches) == 3 and ids(batches) == [f"r{i}" for i in range(11)]
  last = batches[-1]
  assert last.ids[-1] is None and list(last.text.is_real) == [1, 1, 1, 0]
  for batch in batches:
    assert isinstance(batch.text, batching.PreferenceBatch)
    assert batch.frames.shape == (BATCH, *FRAME_SHAPE)
    longest = max(len(encoder.prompt(source.records[int(i[1:])]["prompt"]))
                  for i in batch.ids if i is not None)
    assert batch.text.prompt_ids.shape[1] == batching.bucket_length(
        longest, offset=NUM_VIDEO)
    for row, record_id in enumerate(batch.ids):
      if record_id is None:
        assert not batch.frames[row].any()
        continue
      i = int(record_id[1:])
      record = source.records[i]
      expected = encoder.preference(record["prompt"], record["chosen"],
                                    record["rejected"])
      t = batch.text
      np.testing.assert_array_equal(t.prompt_ids[row][t.prompt_mask[row]],
                                    expected.prompt)
      np.testing.assert_array_equal(t.chosen_ids[row][t.chosen_mask[row]],
                                    expected.chosen)
      np.testing.assert_array_equal(
          t.rejected_ids[row][t.rejected_mask[row]], expected.rejected)
      assert (batch.frames[row] == i).all()


def test_two_hosts_see_disjoint_shards_covering_the_dataset(encoder):
  hosts = [list(make(encoder, seed=3, process_index=i, process_count=2))
           for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 2  # Padded to the same count.
  seen = [ids(batches) for batches in hosts]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(f"r{i}" for i in range(11))


def test_shuffle_is_seeded_and_changes_every_epoch(encoder):
  first = ids(make(encoder, seed=1, num_epochs=2))
  assert first == ids(make(encoder, seed=1, num_epochs=2))
  assert first != ids(make(encoder, seed=2, num_epochs=2))
  epoch0, epoch1 = first[:NUM_RECORDS], first[NUM_RECORDS:]
  assert sorted(epoch0) == sorted(epoch1) == sorted(f"r{i}" for i in range(11))
  assert epoch0 != epoch1
  assert len(make(encoder, num_epochs=2)) == 6


def test_restoring_the_iterator_state_resumes_exactly(encoder):
  it = iter(make(encoder, seed=5, num_epochs=None))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(make(encoder, seed=5, num_epochs=None))
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(4))):
    assert got.ids == want.ids
    np.testing.assert_array_equal(got.frames, want.frames)
    for field in ("prompt_ids", "chosen_ids", "rejected_mask"):
      np.testing.assert_array_equal(getattr(got.text, field),
                                    getattr(want.text, field))


def test_records_that_fail_become_dummy_rows_and_are_counted(encoder):
  source = MemorySource(5)
  source.records[2]["prompt"] = "What is " + "this " * 500 + "?"
  ldr = make(encoder, source, shuffle=False)
  (first, second) = list(ldr)
  assert first.ids == ["r0", "r1", None, "r3"]
  assert list(first.text.is_real) == [1, 1, 0, 1]
  assert [(e.path, e.line, e.reason) for e in first.errors] == [
      ("memory", 3, "prompt_too_long")]
  assert "record r2" in first.errors[0].detail
  assert ldr.report.counts == {"prompt_too_long": 1}
  assert ldr.report.num_good == 4 and second.ids[0] == "r4"


def test_jsonl_source_decodes_videos_and_skips_broken_ones(encoder, tmp_path):
  root = tmp_path / "videos"
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    (root / name).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(
          root / name / f"{i}.png")
  (root / "broken").mkdir()
  (root / "broken" / "0.jpg").write_bytes(b"not a jpeg")
  qa = [{"id": name, "video": name, "conversations": [
      {"from": "human", "value": "What is the man riding?"},
      {"from": "gpt", "value": "No."}]} for name in ("a", "broken", "b")]
  path = tmp_path / "qa.jsonl"
  records.write_jsonl(path, qa[:2] + [{"id": "no video"}] + qa[2:])
  source = loader.JsonlSource(path, "qa", video_cache.Frames(root, 2, 8))
  assert source.report.counts == {"missing_field": 1}
  assert source.locate(2) == (str(path), 4)
  ldr = make(encoder, source, task="prompt", shuffle=False)
  (batch,) = list(ldr)
  assert isinstance(batch.text, batching.PromptBatch)
  assert batch.ids == ["a", None, "b", None]
  prompt = batch.text.prompt_ids[0][batch.text.prompt_mask[0]]
  np.testing.assert_array_equal(prompt,
                                encoder.prompt("What is the man riding?"))
  expected = video.resize_and_crop(video.read_video(root / "b", 2), 8)
  np.testing.assert_array_equal(batch.frames[2], expected)
  assert ldr.report.counts == {"bad_video": 1}
  (error,) = ldr.report.errors
  assert (error.path, error.line) == (str(path), 2)
  assert "broken" in error.detail


def test_sft_task_and_unknown_task(encoder, tmp_path):
  source = MemorySource(2)
  for record in source.records:
    record["conversations"] = [{"from": "human", "value": record["prompt"]},
                               {"from": "gpt", "value": record["chosen"]}]
  (batch,) = list(make(encoder, source, task="sft", shuffle=False))
  assert isinstance(batch.text, batching.SftBatch)
  assert batch.text.loss_mask[:2].any(axis=1).all()
  with pytest.raises(ValueError, match="preference"):
    make(encoder, source, task="dpo")
