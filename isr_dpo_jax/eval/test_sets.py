"""VideoQA test sets in the ShareGPTVideo test-QA format, and their names.

A test file is jsonl, one question per line:
  {"id", "video", "caption", "conversations": [
      {"from": "human", "value": "<video>\\n{question}"},
      {"from": "gpt", "value": "{answer}"}]}
as published in huggingface.co/datasets/ShareGPTVideo/test_video_and_instruction
under video_instruction/test/ (LLaVA-Hound-DPO's setup/set_path.sh calls that
folder TEST_DATA_DIR; its test pipelines read `{name}.qa.jsonl` from it, and
its published MSVD/MSRVTT/TGIF table the 5k-question subsets
`{name}.qa.official.jsonl`, registered here as `{name}_official`). The caption
is needed only by a judge that reads it (eval.protocols).
"""
import dataclasses
import logging
import os
from pathlib import Path

from isr_dpo_jax.data import records as records_lib

VIDEO_PLACEHOLDER = "<video>"

# The registry: short name -> file in the test folder.
IN_DOMAIN = ("actnet", "vidal", "webvid")
OUT_DOMAIN = ("msvd", "msrvtt", "tgif", "ssv2")
OFFICIAL = ("msvd_official", "msrvtt_official", "tgif_official")
TEST_SET_FILES = {name: f"{name}.qa.jsonl" for name in IN_DOMAIN + OUT_DOMAIN}
TEST_SET_FILES |= {name: f"{name.removesuffix('_official')}.qa.official.jsonl"
                   for name in OFFICIAL}


@dataclasses.dataclass(frozen=True)
class QARecord:
  """One test question about one video, with its ground truth."""
  id: str
  video: str
  question: str
  answer: str
  caption: str  # "" where the test file has none
  line: int  # in the test file, for file:line in messages


@dataclasses.dataclass(frozen=True)
class TestSet:
  name: str
  path: Path
  records: list[QARecord]
  errors: list[records_lib.RecordError]  # bad lines and repeated ids, logged

  @property
  def skipped(self) -> int:
    return len(self.errors)


def resolve_test_set(name_or_path: str,
                     root: str | os.PathLike[str] | None) -> tuple[str, Path]:
  """(name, file) of a registered test set under `root`, or of any file."""
  if name_or_path in TEST_SET_FILES:
    if root is None:
      raise ValueError(f"test set {name_or_path!r} needs the test folder "
                       "(config test_root) holding " +
                       TEST_SET_FILES[name_or_path])
    return name_or_path, Path(root) / TEST_SET_FILES[name_or_path]
  path = Path(name_or_path)
  if not path.is_file():
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a test-QA file nor a registered test set "
        f"({', '.join(TEST_SET_FILES)})")
  return path.name.removesuffix(".jsonl").removesuffix(".qa"), path


def load_test_set(name_or_path: str,
                  root: str | os.PathLike[str] | None = None,
                  max_error_rate: float | None = None, *,
                  with_caption: bool = True) -> TestSet:
  """Reads a test set; bad records and repeated ids are skipped and counted.

  Each skipped line is logged as file:line with the reason (records.ReadReport);
  without a caption, a record is bad only `with_caption`.
  Raises records.TooManyBadRecords above `max_error_rate` bad records.
  """
  name, path = resolve_test_set(name_or_path, root)
  report = records_lib.ReadReport()
  by_id = {}
  kind = "test_qa" if with_caption else "qa"
  for line, row in records_lib.iter_jsonl(path, kind, report):
    if (first := by_id.get(row["id"])) is not None:
      report.skip(path, line, records_lib.BadRecord(
          "repeated_id", f"{row['id']!r}, first on line {first.line}"))
      continue
    by_id[row["id"]] = to_qa_record(row, line)
    report.count_good()
  logging.info("%s: %s", path, report.summary())
  report.check(max_error_rate)
  return TestSet(name=name, path=path, records=list(by_id.values()),
                 errors=report.errors)


def to_qa_record(row: records_lib.Record, line: int) -> QARecord:
  """The first question and answer of a validated test-QA record."""
  question, answer = records_lib.conversation_turns(row["conversations"])[0]
  return QARecord(id=row["id"], video=row["video"],
                  question=question.replace(VIDEO_PLACEHOLDER, "").strip(),
                  answer=answer, caption=row.get("caption", ""), line=line)
