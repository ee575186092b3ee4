"""Record readers and writers: validation, error accounting, crash safety."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from isr_dpo_jax.data import records

QA = {"id": "v1_0", "video": "v1", "conversations": [
    {"from": "human", "value": "<video>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."}]}
DPO = {"id": 7, "video": "v2.mp4", "prompt": "<video>\nWhy?",
       "chosen": "Because.", "rejected": "No.", "chosen_score": 4.5}
TEST_QA = {**QA, "id": "t1", "caption": "A cat sits."}


def write_lines(path, lines):
  path.write_bytes(b"".join(
      (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
      for line in lines))
  return path


@pytest.mark.parametrize("kind,record", [("qa", QA), ("dpo", DPO),
                                         ("test_qa", TEST_QA)])
def test_reads_the_three_formats_with_extra_fields(tmp_path, kind, record):
  path = write_lines(tmp_path / "a.jsonl", [record] * 2)
  report = records.read_jsonl(path, kind)
  assert report.records == [{**record, "id": str(record["id"])}] * 2
  assert not report.errors and report.error_rate == 0


BAD_LINES = [
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b'{"id": "x", "video": ', "bad_json"),
    (b"[1, 2]", "not_an_object"),
    ({"video": "v", "conversations": QA["conversations"]}, "missing_field"),
    ({**QA, "video": 3}, "wrong_type"),
    ({**QA, "id": True}, "wrong_type"),
    ({**QA, "conversations": QA["conversations"][:1]}, "bad_conversation"),
    ({**QA, "conversations": QA["conversations"][::-1]}, "bad_conversation"),
    ({**QA, "conversations": [{"from": "human"},
                              {"from": "gpt", "value": "A"}]},
     "bad_conversation"),
    ({**QA, "video": "not_there"}, "missing_video"),
]


def test_bad_lines_are_skipped_named_and_counted(tmp_path, caplog):
  (tmp_path / "videos" / "v1").mkdir(parents=True)
  lines = [QA]
  for bad, _ in BAD_LINES:
    lines += [bad, QA]
  path = write_lines(tmp_path / "qa.jsonl", lines + [b"   "])
  report = records.read_jsonl(path, "qa", video_root=tmp_path / "videos")
  assert report.records == [QA] * (len(BAD_LINES) + 1)
  assert [(e.path, e.line, e.reason) for e in report.errors] == [
      (str(path), 2 * i + 2, reason) for i, (_, reason) in enumerate(BAD_LINES)]
  assert report.counts["bad_conversation"] == 3
  assert report.num_seen == 2 * len(BAD_LINES) + 1
  assert f"{path}:2: not_utf8" in caplog.text
  assert f"{path}:20: missing_video" in caplog.text


def test_error_rate_above_the_maximum_stops_with_the_reasons(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [DPO, {**DPO, "chosen": None}, DPO,
                                            b"{oops"])
  assert len(records.read_jsonl(path, "dpo", max_error_rate=0.5).records) == 2
  with pytest.raises(records.TooManyBadRecords) as e:
    records.read_jsonl(path, "dpo", max_error_rate=0.4)
  message = str(e.value)
  assert "2 of 4" in message and f"{path}:2: wrong_type" in message
  assert f"{path}:4: bad_json" in message


def test_unknown_format_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="dpo"):
    records.read_jsonl(write_lines(tmp_path / "a.jsonl", [QA]), "sharegpt")


def test_report_is_reusable_by_later_stages(tmp_path):
  report = records.ReadReport()
  report.keep({"id": "a"})
  report.skip("judge", 3, records.BadRecord("unparsable_verdict", "no A or B"))
  assert report.summary() == "1 good, 1 skipped {'unparsable_verdict': 1}"
  records.write_errors(tmp_path / "errors.jsonl", report)
  (line,) = (tmp_path / "errors.jsonl").read_text().splitlines()
  assert json.loads(line) == {"path": "judge", "line": 3,
                              "reason": "unparsable_verdict",
                              "detail": "no A or B"}


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_load_jsonl_reads_back_what_was_written_and_closes_the_file(tmp_path):
  path = tmp_path / "pairs.jsonl"
  records.write_jsonl(path, [DPO, QA])
  assert records.load_jsonl(path) == [DPO, QA]


def test_load_jsonl_names_the_line_that_is_not_json(tmp_path):
  path = write_lines(tmp_path / "a.jsonl", [QA, b"", b"{cut"])
  with pytest.raises(records.BadRecord, match=r"a\.jsonl:3: "):
    records.load_jsonl(path)


def test_write_jsonl_is_atomic(tmp_path):
  path = tmp_path / "out" / "pairs.jsonl"
  records.write_jsonl(path, [DPO, QA])
  assert [json.loads(l) for l in path.read_text().splitlines()] == [DPO, QA]
  with pytest.raises(TypeError):
    records.write_jsonl(path, [DPO, {"id": object()}])
  # The old file survives a failed write, and no temporary file is left.
  assert [json.loads(l) for l in path.read_text().splitlines()] == [DPO, QA]
  assert os.listdir(path.parent) == ["pairs.jsonl"]


def test_write_jsonl_gives_the_mode_of_the_umask(tmp_path):
  umask = os.umask(0o027)
  try:
    records.write_jsonl(tmp_path / "pairs.jsonl", [DPO])
  finally:
    os.umask(umask)
  assert stat.S_IMODE((tmp_path / "pairs.jsonl").stat().st_mode) == 0o640


def test_appender_drops_a_partial_last_line(tmp_path, caplog):
  path = tmp_path / "gen.jsonl"
  path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
  with records.JsonlAppender(path) as out:
    assert out.done == {"a", "b"}
    assert "dropping a partial last line" in caplog.text
    out.append({"id": "c", "text": "é"})
    with pytest.raises(ValueError, match="already written"):
      out.append({"id": "a"})
  assert [json.loads(l)["id"] for l in path.read_text().splitlines()] == [
      "a", "b", "c"]


def test_appender_keeps_a_complete_last_line_without_newline(tmp_path):
  path = tmp_path / "gen.jsonl"
  path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
  with records.JsonlAppender(path) as out:
    out.append({"id": "c"})
  assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_appender_resumes_after_kill_9_without_loss_or_duplicates(tmp_path):
  path = tmp_path / "gen.jsonl"
  writer = textwrap.dedent(f"""
      from isr_dpo_jax.data import records
      out = records.JsonlAppender({str(path)!r})
      for i in range(1_000_000):
        if str(i) not in out.done:
          out.append({{"id": str(i), "text": "x" * 5000}})
  """)
  for megabytes in (2, 4):  # Killed twice, mid-stream wherever it is.
    proc = subprocess.Popen([sys.executable, "-c", writer])
    while not path.exists() or path.stat().st_size < megabytes * 1_000_000:
      assert proc.poll() is None, "the writer died by itself"
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  out = records.JsonlAppender(path)
  ids = [r["id"] for r in out.records]
  assert ids == [str(i) for i in range(len(ids))]  # No gap, no duplicate.
  for i in range(len(ids), len(ids) + 5):
    out.append({"id": str(i)})
  out.close()
  lines = path.read_text().splitlines()
  assert [json.loads(l)["id"] for l in lines] == [
      str(i) for i in range(len(ids) + 5)]
