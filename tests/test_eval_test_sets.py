"""Test-QA reading and the test-set registry."""
import json
import logging

import pytest

from isr_dpo_jax.data import records
from isr_dpo_jax.eval import test_sets


def _row(i, **overrides):
  row = {"id": f"v{i}_0", "video": f"msvd/v{i}", "caption": f"caption {i}",
         "conversations": [
             {"from": "human", "value": f"<video>\nWhat happens in {i}?"},
             {"from": "gpt", "value": f"Answer {i}."}]}
  return row | overrides


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_reads_records_and_skips_bad_ones_with_file_and_line(tmp_path, caplog):
  lines = [json.dumps(_row(0)), "{not json", json.dumps(_row(1)), "",
           json.dumps({k: v for k, v in _row(7).items() if k != "caption"}),
           json.dumps(_row(8, conversations=_row(8)["conversations"][::-1])),
           json.dumps(_row(0, caption="same id again")),
           json.dumps(_row(9, id=None)),
           json.dumps(_row(2))]
  path = _write(tmp_path / "mine.qa.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    test_set = test_sets.load_test_set(str(path))
  assert test_set.name == "mine"
  assert test_set.records == [
      test_sets.QARecord(id=f"v{i}_0", video=f"msvd/v{i}",
                         question=f"What happens in {i}?",
                         answer=f"Answer {i}.", caption=f"caption {i}",
                         line=line)
      for i, line in zip(range(3), (1, 3, 9))]
  assert test_set.skipped == 5
  for line in (2, 5, 6, 8):
    assert f"{path}:{line}: " in caplog.text
  assert f"{path}:7: repeated_id: 'v0_0', first on line 1" in caplog.text


def test_too_many_bad_records_stop_the_run(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [json.dumps(_row(0)), "{", "{"])
  with pytest.raises(records.TooManyBadRecords, match="bad.jsonl:2"):
    test_sets.load_test_set(str(path), max_error_rate=0.5)


def test_registry_maps_names_to_the_sharegptvideo_test_folder(tmp_path):
  assert set(test_sets.TEST_SET_FILES) == {
      "msvd", "msrvtt", "tgif", "ssv2", "actnet", "vidal", "webvid",
      "msvd_official", "msrvtt_official", "tgif_official"}
  # LLaVA-Hound-DPO's test/pipeline/outdomain_official_test_pipeline.sh reads
  # $TEST_DATA_DIR/${data_name}.qa.official.jsonl.
  assert test_sets.TEST_SET_FILES["msrvtt_official"] == "msrvtt.qa.official.jsonl"
  _write(tmp_path / "tgif.qa.jsonl", [json.dumps(_row(1))])
  test_set = test_sets.load_test_set("tgif", tmp_path)
  assert (test_set.name, test_set.path) == ("tgif", tmp_path / "tgif.qa.jsonl")
  assert len(test_set.records) == 1
  with pytest.raises(ValueError, match="test_root"):
    test_sets.load_test_set("tgif", None)
  with pytest.raises(FileNotFoundError, match="msvd, msrvtt"):
    test_sets.load_test_set(str(tmp_path / "nope.jsonl"))


def test_captions_are_needed_only_by_a_judge_that_reads_them(tmp_path, caplog):
  without = {k: v for k, v in _row(3).items() if k != "caption"}
  path = _write(tmp_path / "official.jsonl", [json.dumps(without)])
  test_set = test_sets.load_test_set(str(path), with_caption=False)
  assert [(r.id, r.caption) for r in test_set.records] == [("v3_0", "")]
  with caplog.at_level(logging.WARNING):
    assert test_sets.load_test_set(str(path)).skipped == 1
  assert f"{path}:1: missing_field: caption" in caplog.text
