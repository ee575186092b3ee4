"""Self-retrospective context prompts and self-judge decisions (METHOD.md 2).

The policy judges its own pair of answers twice, once with y1 shown as
"Response A" and once with y2 as "Response A", which cancels its position
bias. Two judges share that protocol:

* likelihood (default): one forward pass per order; the model's next-token
  probabilities of the letters A and B, renormalised over the two letters;
* generative: the model writes a verdict, parsed by `parse_verdict`; a verdict
  naming no single response is counted as unparsable, never guessed.

A pair is kept only when both orders agree and the averaged preference for
the winner reaches `threshold`; everything dropped is dropped with a reason.
"""
from collections.abc import Sequence
import dataclasses
import re

import numpy as np

FIRST_CONTEXT = (
    "Describe this video in detail: the objects and people, their attributes, "
    "what happens, and in what order.")
RETROSPECTIVE_CONTEXT = (
    "Here is a description of this video written earlier: {previous}\n"
    "Watch the video again and write an improved detailed description. Keep "
    "what is correct, correct what is wrong, and add what is missing.")
JUDGE = (
    "{context}Question: {question}\nResponse A: {response_a}\n"
    "Response B: {response_b}\nWhich response answers the question more "
    "accurately and is better grounded in the video and its description? Do "
    "not prefer a response for being longer. Answer with a single letter, A "
    "or B.")
JUDGE_CONTEXT = "Video description: {context}\n"

# Why a pair yields no preference (counted in each iteration's summary).
IDENTICAL = "identical_responses"
INCONSISTENT = "orders_disagree"
LOW_CONFIDENCE = "below_threshold"
UNPARSABLE = "unparsable_verdict"


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Prompt wording; configs may override every field."""
  first_context: str = FIRST_CONTEXT
  retrospective_context: str = RETROSPECTIVE_CONTEXT
  judge: str = JUDGE
  judge_context: str = JUDGE_CONTEXT


def context_question(prompts: Prompts, previous: str | None) -> str:
  """The request for c_t: from scratch, or revisiting c_{t-1}."""
  if previous is None:
    return prompts.first_context
  return prompts.retrospective_context.format(previous=previous)


def judge_question(prompts: Prompts, question: str, response_a: str,
                   response_b: str, context: str | None) -> str:
  """The judge's question; `context=None` is the no-context ablation."""
  block = "" if context is None else prompts.judge_context.format(context=context)
  return prompts.judge.format(context=block, question=question,
                              response_a=response_a, response_b=response_b)


def judge_questions(prompts: Prompts, question: str, y1: str, y2: str,
                    context: str | None) -> tuple[str, str]:
  """Both orders: (y1 as A, y2 as B), then (y2 as A, y1 as B)."""
  return (judge_question(prompts, question, y1, y2, context),
          judge_question(prompts, question, y2, y1, context))


def preference_from_letters(letter_logps_Nx2x2: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
  """P(y1 better), averaged over orders, and whether both orders agree.

  Args:
    letter_logps_Nx2x2: log-probabilities of the next token being the letter
      [A, B] (last axis) for order 0 (y1 shown as A) and order 1 (y2 shown as
      A) (middle axis). Any normalisation works: only the A-vs-B odds count.

  Returns:
    p_y1_N: the probability that y1 is better, averaged over both orders.
    agree_N: whether each order on its own prefers the same response.
  """
  logps = np.asarray(letter_logps_Nx2x2, np.float64)
  p_a = 1.0 / (1.0 + np.exp(logps[..., 1] - logps[..., 0]))  # [N, 2]
  p_y1_by_order = np.stack([p_a[:, 0], 1.0 - p_a[:, 1]], axis=1)
  agree = (p_y1_by_order[:, 0] > 0.5) == (p_y1_by_order[:, 1] > 0.5)
  return p_y1_by_order.mean(axis=1), agree


def preference_from_verdicts(verdicts: Sequence[tuple[str | None, str | None]]
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """P(y1 better), agreement and parsability from parsed letters per order."""
  p_y1, agree, parsed = [], [], []
  for first, second in verdicts:
    ok = first is not None and second is not None
    y1_first, y1_second = first == "A", second == "B"
    parsed.append(ok)
    agree.append(ok and y1_first == y1_second)
    p_y1.append((float(y1_first) + float(y1_second)) / 2 if ok else 0.5)
  return np.asarray(p_y1), np.asarray(agree), np.asarray(parsed)


@dataclasses.dataclass(frozen=True)
class Decision:
  """The outcome for one (y1, y2) pair: a winner (0 or 1) or a drop reason."""
  winner: int | None
  confidence: float
  reason: str | None


def decide(y1: str, y2: str, p_y1: float, agree: bool, threshold: float,
           parsed: bool = True, require_agreement: bool = True) -> Decision:
  """Keeps the pair or says why not (identical, unparsable, disagree, weak).

  `require_agreement=False` keeps order-inconsistent pairs on the averaged
  preference alone (for untrained models, whose letter bias dominates).
  """
  confidence = max(p_y1, 1.0 - p_y1)
  if y1.strip() == y2.strip():
    return Decision(None, confidence, IDENTICAL)
  if not parsed:
    return Decision(None, confidence, UNPARSABLE)
  if require_agreement and not agree:
    return Decision(None, confidence, INCONSISTENT)
  if confidence < threshold:
    return Decision(None, confidence, LOW_CONFIDENCE)
  return Decision(0 if p_y1 > 0.5 else 1, confidence, None)


_LEADING_LETTER = re.compile(r"^\W*\(?([AB])(?:\)|[.:,!]|\s*$)")
_NAMED_LETTER = re.compile(r"\b(?i:response|answer|option)\s*\(?([AB])\)?\b")


def parse_verdict(text: str) -> str | None:
  """"A" or "B" from a written verdict; None when it names no single one.

  Grammar: a verdict that starts with the letter standing alone ("A",
  "(B) is better", "B: ...", but not "A square ...") names it; otherwise every "Response X" / "Answer X" / "Option X" mention
  counts, and the verdict parses only when all of them name the same letter.
  """
  match = _LEADING_LETTER.match(text)
  if match:
    return match.group(1)
  named = set(_NAMED_LETTER.findall(text))
  return named.pop() if len(named) == 1 else None
