"""Judge protocols: what the judge is asked about an answer, how replies read.

"caption_grounded" (judge_prompt.py) is the protocol of ISR-DPO's evaluation
code: the judge sees the video's caption and scores 1-5; accuracy is the share
of scores >= 3. "video_chatgpt" (video_chatgpt_prompt.py) is the protocol of
LLaVA-Hound-DPO's published MSVD/MSRVTT/TGIF table: no caption, a yes/no
verdict and a 0-5 score; accuracy is the share of "yes". Numbers from one
cannot be compared with numbers from the other.
"""
from collections.abc import Callable
import dataclasses

from isr_dpo_jax.eval import judge_prompt
from isr_dpo_jax.eval import test_sets
from isr_dpo_jax.eval import video_chatgpt_prompt


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What a judge reply says; None where the reply does not say it."""
  correct: bool | None
  score: float | None


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How one answer is put to the judge and how its reply is read.

  Attributes:
    name: the value of config.eval.protocol.
    system: the judge's system message, if any; the judge adds it.
    user_message: (test record, prediction) -> the judge's user message.
    parse: reply -> Verdict.
    needs_caption: whether test records must carry a caption.
  """
  name: str
  system: str | None
  user_message: Callable[[test_sets.QARecord, str], str]
  parse: Callable[[str], Verdict]
  needs_caption: bool


def _caption_grounded_parse(reply: str) -> Verdict:
  score = judge_prompt.parse_score(reply)
  passed = None if score is None else score >= judge_prompt.PASSING_SCORE
  return Verdict(correct=passed, score=score)


CAPTION_GROUNDED = Protocol(
    name="caption_grounded", system=None,
    user_message=lambda record, prediction: judge_prompt.judge_prompt(
        caption=record.caption, question=record.question,
        answer=record.answer, prediction=prediction),
    parse=_caption_grounded_parse, needs_caption=True)

VIDEO_CHATGPT = Protocol(
    name="video_chatgpt", system=video_chatgpt_prompt.SYSTEM_PROMPT,
    user_message=lambda record, prediction: video_chatgpt_prompt.user_message(
        question=record.question, answer=record.answer, prediction=prediction),
    parse=lambda reply: Verdict(
        correct=video_chatgpt_prompt.parse_verdict(reply),
        score=video_chatgpt_prompt.parse_score(reply)),
    needs_caption=False)

PROTOCOLS = {p.name: p for p in (CAPTION_GROUNDED, VIDEO_CHATGPT)}


def get(name: str) -> Protocol:
  try:
    return PROTOCOLS[name]
  except KeyError:
    raise ValueError(f"eval.protocol must be one of {sorted(PROTOCOLS)}, "
                     f"not {name!r}") from None
