"""JSON-lines records: the ShareGPTVideo / LLaVA-Hound formats, validated.

Three formats (docs/method.md §5):
  qa:       {"id", "video", "conversations": [{"from": "human", "value"},
                                              {"from": "gpt", "value"}, ...]}
  dpo:      {"id", "video", "prompt", "chosen", "rejected"} + any extra fields
  test_qa:  {"id", "video", "caption", "conversations": [...]}
Extra fields are kept in every format; ids may be strings or integers and are
read as strings.

Error accounting. A bad record (a line that is not UTF-8 or not a JSON
object, a missing or mistyped field, a malformed conversation, a video that
is not under the video root) is skipped, logged as `file:line: reason:
detail`, and counted in a ReadReport; the caller gets the good records and
the report, and a maximum error rate turns too many skips into a
TooManyBadRecords exception. Later stages (tokenisation, generation,
judging) raise BadRecord for their own bad inputs and count them in a
ReadReport the same way.

Reading back. `load_jsonl` reads a jsonl file that the program wrote itself
(the run's artifacts): every line's value, no validation.

Writing. `write_jsonl` replaces a file atomically (temporary file, fsync,
rename). `JsonlAppender` is for stages that write as they go: it flushes each
record as one line, and on reopening after a crash (kill -9) it drops a
partial last line, so a resumed stage neither loses nor repeats records.
"""
import collections
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
import dataclasses
import json
import logging
import operator
import os
from pathlib import Path
import secrets
from typing import Any

from isr_dpo_jax import errors

Record = dict[str, Any]

REQUIRED_FIELDS = {
    "qa": {"id": (str, int), "video": str, "conversations": list},
    "dpo": {"id": (str, int), "video": str, "prompt": str, "chosen": str,
            "rejected": str},
    "test_qa": {"id": (str, int), "video": str, "caption": str,
                "conversations": list},
}
_ROLES = ("human", "gpt")


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is a short category to count."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class TooManyBadRecords(errors.UserError):
  """The share of bad records passed the allowed maximum."""


@dataclasses.dataclass(frozen=True)
class RecordError:
  path: str
  line: int
  reason: str
  detail: str

  def __str__(self):
    return f"{self.path}:{self.line}: {self.reason}: {self.detail}"


@dataclasses.dataclass
class ReadReport:
  """The good records of a pass over some input, and why the others failed.

  `num_good` counts the good records, also those only counted, not kept
  (`count_good`), as a loader does for every row it yields.
  """
  records: list = dataclasses.field(default_factory=list)
  errors: list[RecordError] = dataclasses.field(default_factory=list)
  num_good: int = 0

  @property
  def num_seen(self) -> int:
    return self.num_good + len(self.errors)

  @property
  def counts(self) -> collections.Counter:
    """Number of errors by reason."""
    return collections.Counter(e.reason for e in self.errors)

  @property
  def error_rate(self) -> float:
    return len(self.errors) / max(self.num_seen, 1)

  def keep(self, record) -> None:
    self.records.append(record)
    self.num_good += 1

  def count_good(self, number: int = 1) -> None:
    self.num_good += number

  def skip(self, path: str | os.PathLike, line: int, error: BadRecord) -> None:
    """Counts a bad record and logs where it is and why it was skipped."""
    entry = RecordError(str(path), line, error.reason, error.detail)
    self.errors.append(entry)
    logging.warning("skipped %s", entry)

  def check(self, max_error_rate: float | None) -> None:
    """Raises TooManyBadRecords if the error rate is above the maximum."""
    if max_error_rate is None or self.error_rate <= max_error_rate:
      return
    first = "\n  ".join(str(e) for e in self.errors[:5])
    raise TooManyBadRecords(
        f"{len(self.errors)} of {self.num_seen} records are bad "
        f"({self.error_rate:.1%} > {max_error_rate:.1%}); by reason: "
        f"{dict(self.counts)}; first:\n  {first}")

  def summary(self) -> str:
    return (f"{self.num_good} good, {len(self.errors)} skipped "
            f"{dict(self.counts)}")


def conversation_turns(conversations: list) -> list[tuple[str, str]]:
  """(question, answer) pairs of a ShareGPT conversation, validated."""
  if not conversations or len(conversations) % 2:
    raise BadRecord("bad_conversation", f"{len(conversations)} messages, "
                    "expected an even number > 0")
  for i, message in enumerate(conversations):
    if not isinstance(message, dict):
      raise BadRecord("bad_conversation", f"message {i} is not an object")
    if message.get("from") != _ROLES[i % 2]:
      raise BadRecord("bad_conversation",
                      f"message {i} is from {message.get('from')!r}, "
                      f"expected {_ROLES[i % 2]!r}")
    if not isinstance(message.get("value"), str):
      raise BadRecord("bad_conversation", f"message {i} has no text value")
  values = [m["value"] for m in conversations]
  return list(zip(values[::2], values[1::2]))


def validate(record: Any, kind: str, video_root: str | os.PathLike | None = None
             ) -> Record:
  """Checks a parsed record of format `kind`; returns it with a string id."""
  if not isinstance(record, dict):
    raise BadRecord("not_an_object", f"a JSON {type(record).__name__}")
  for field, types in REQUIRED_FIELDS[kind].items():
    if field not in record:
      raise BadRecord("missing_field", field)
    if not isinstance(record[field], types) or isinstance(record[field], bool):
      raise BadRecord("wrong_type",
                      f"{field} is a {type(record[field]).__name__}")
  if "conversations" in record:
    conversation_turns(record["conversations"])
  if video_root is not None:
    video = Path(video_root) / record["video"]
    if not video.exists():
      raise BadRecord("missing_video", str(video))
  return {**record, "id": str(record["id"])}


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, bytes) of each non-blank line."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, line


def parse_line(line: bytes) -> Any:
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord("not_utf8", str(e)) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecord("bad_json", str(e)) from None


def iter_jsonl(
    path: str | os.PathLike,
    kind: str,
    report: ReadReport,
    video_root: str | os.PathLike | None = None,
) -> Iterator[tuple[int, Record]]:
  """Yields (line number, record) of good lines; bad ones go to `report`."""
  if kind not in REQUIRED_FIELDS:
    raise ValueError(f"unknown record format {kind!r}; "
                     f"known: {sorted(REQUIRED_FIELDS)}")
  for number, line in iter_lines(path):
    try:
      record = validate(parse_line(line), kind, video_root)
    except BadRecord as e:
      report.skip(path, number, e)
      continue
    yield number, record


def read_jsonl(
    path: str | os.PathLike,
    kind: str,
    video_root: str | os.PathLike | None = None,
    max_error_rate: float | None = None,
) -> ReadReport:
  """Reads and validates a jsonl file of format `kind` ("qa", "dpo", "test_qa").

  Args:
    path: the jsonl file.
    kind: the record format.
    video_root: when given, a record whose video is not under it is bad.
    max_error_rate: above this share of bad records, raise TooManyBadRecords.

  Returns:
    A ReadReport with the good records (dicts, in file order) and the errors.
  """
  report = ReadReport()
  for _, record in iter_jsonl(path, kind, report, video_root):
    report.keep(record)
  logging.info("%s: %s", path, report.summary())
  report.check(max_error_rate)
  return report


def load_jsonl(path: str | os.PathLike) -> list[Any]:
  """The values of a jsonl file's non-blank lines, in order: for the files
  the program wrote (user files go through `read_jsonl`, which validates).

  Raises:
    BadRecord: a line that is not JSON, naming `path:line`.
  """
  values = []
  for number, line in iter_lines(path):
    try:
      values.append(parse_line(line))
    except BadRecord as e:
      raise BadRecord(e.reason, f"{path}:{number}: {e.detail}") from None
  return values


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
  """Writes records as jsonl, atomically: readers see the old or new file.

  The file gets the mode any new file gets (the umask's), not the 0600 of a
  `tempfile.mkstemp` file.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
  try:
    with open(tmp, "x", encoding="utf-8") as f:
      for record in records:
        f.write(_dumps(record))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


class JsonlAppender:
  """An append-only jsonl file that survives being killed mid-write.

  On opening, the complete records already in the file are read (`records`,
  their keys in `done`); a partial last line left by a killed writer is cut
  off. `append` writes one record per line and flushes, so what a killed
  process appended is on disk up to its last complete line. Appending a key
  that is already done raises, so a resumed stage cannot duplicate records.
  """

  def __init__(self, path: str | os.PathLike,
               key: Callable[[Record], Hashable] = operator.itemgetter("id")):
    self.path = Path(path)
    self.key = key
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.records = self._recover()
    self.done = {key(r) for r in self.records}
    self._file = open(self.path, "a", encoding="utf-8")

  def _recover(self) -> list[Record]:
    if not self.path.exists():
      return []
    data = self.path.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail.strip():
      if _is_object(tail):  # A complete last record, only its newline missing.
        with open(self.path, "ab") as f:
          f.write(b"\n")
      else:
        logging.warning("%s: dropping a partial last line of %d bytes",
                        self.path, len(tail))
        os.truncate(self.path, end)
    records = []
    for number, line in iter_lines(self.path):
      try:
        records.append(parse_line(line))
      except BadRecord as e:
        raise ValueError(f"{self.path}:{number}: {e}") from None
    return records

  def append(self, record: Mapping) -> None:
    key = self.key(record)
    if key in self.done:
      raise ValueError(f"{self.path}: record {key!r} is already written")
    self._file.write(_dumps(record))
    self._file.flush()
    self.done.add(key)
    self.records.append(dict(record))

  def close(self) -> None:
    os.fsync(self._file.fileno())
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_errors(path: str | os.PathLike, report: ReadReport) -> None:
  """Writes a report's errors as jsonl, the error log of a stage."""
  write_jsonl(path, (dataclasses.asdict(e) for e in report.errors))


def _is_object(line: bytes) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


def _dumps(record: Mapping) -> str:
  return json.dumps(record, ensure_ascii=False) + "\n"
