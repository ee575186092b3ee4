"""Results tables: one row per test set, as markdown and as jsonl."""
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from isr_dpo_jax.data import records
from isr_dpo_jax.eval import scoring


@dataclasses.dataclass(frozen=True)
class ResultRow:
  """Scores and answer lengths of one test set."""
  test_set: str
  protocol: str  # the judge protocol (eval.protocols), or "match"
  n: int  # records answered: judged or checked
  skipped: int  # never answered: bad test lines, repeated ids, bad videos
  accuracy: float | None  # share in [0, 1], over scored samples
  score: float | None  # mean judge score; None for answer matching
  scored: int
  parse_failures: int  # judge replies without a score
  unjudged: int  # no judge reply yet (request errors); rerun to fill in
  words: scoring.LengthStats | None
  tokens: scoring.LengthStats | None = None


_COLUMNS = ("Test set", "Protocol", "n", "Skipped", "Acc. (%)", "Score",
            "Parse fail.", "Unjudged", "Words mean / med / p90",
            "Tokens mean / med / p90")


def _number(value: float | None, scale: float = 1.0) -> str:
  return "-" if value is None else f"{value * scale:.2f}"


def _lengths(stats: scoring.LengthStats | None) -> str:
  if stats is None:
    return "-"
  return f"{stats.mean:.1f} / {stats.median:.1f} / {stats.p90:.1f}"


def to_markdown(rows: Sequence[ResultRow]) -> str:
  lines = ["| " + " | ".join(_COLUMNS) + " |",
           "|" + "|".join("---" for _ in _COLUMNS) + "|"]
  for row in rows:
    cells = (row.test_set, row.protocol, str(row.n), str(row.skipped),
             _number(row.accuracy, 100), _number(row.score),
             str(row.parse_failures), str(row.unjudged),
             _lengths(row.words), _lengths(row.tokens))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[ResultRow],
                 workdir: str | os.PathLike[str]) -> tuple[Path, Path]:
  """Writes results.md and results.jsonl into `workdir`; returns both paths."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  markdown, jsonl = workdir / "results.md", workdir / "results.jsonl"
  markdown.write_text(to_markdown(rows), encoding="utf-8")
  records.write_jsonl(jsonl, map(dataclasses.asdict, rows))
  return markdown, jsonl
