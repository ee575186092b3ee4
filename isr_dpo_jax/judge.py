"""Self-retrospective context prompts and the judging protocol (docs/method.md §2).

The loop's judge (judges.py) compares two answers of the policy, y1 and y2,
in both orders: once with y1 shown as "Response A" and once with y2 as
"Response A", which cancels a position bias. Whatever the judge, it gives
P(y1 better) per order (`letter_preferences` for letter odds,
`verdict_preferences` for written verdicts) or a reason it has no verdict;
`average_orders` and `decide` then treat every judge alike. A pair is kept
only when both orders agree and the averaged preference for the winner
reaches `threshold`; everything dropped is dropped with a reason.

This module holds the wording, the arithmetic and the judge names that
config validation accepts; it imports no jax.
"""
from collections.abc import Sequence
import dataclasses
import re

import numpy as np

# config.self_judge.mode: the names of judges.JUDGES, readable without jax.
MODES = ("likelihood", "generative", "ground_truth")

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


def letter_preferences(letter_logps_Nx2x2: np.ndarray) -> np.ndarray:
  """P(y1 better) in each order, from the judge's odds of the letters A and B.

  Args:
    letter_logps_Nx2x2: log-probabilities of the next token being the letter
      [A, B] (last axis) for order 0 (y1 shown as A) and order 1 (y2 shown as
      A) (middle axis). Any normalisation works: only the A-vs-B odds count.

  Returns:
    p_y1_Nx2: the probability that y1 is better, in order 0 and in order 1.
  """
  logps = np.asarray(letter_logps_Nx2x2, np.float64).reshape(-1, 2, 2)
  p_a = 1.0 / (1.0 + np.exp(logps[..., 1] - logps[..., 0]))  # [N, 2]
  return np.stack([p_a[:, 0], 1.0 - p_a[:, 1]], axis=1)


def verdict_preferences(verdicts: Sequence[tuple[str | None, str | None]]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """P(y1 better) per order (1 or 0) from parsed letters, and parsability.

  A pair with an unparsable verdict in either order gets 0.5 in both.
  """
  parsed = np.array([a is not None and b is not None for a, b in verdicts], bool)
  votes = np.array([(a == "A", b == "B") for a, b in verdicts], np.float64)
  p_y1_Nx2 = np.where(parsed[:, None], votes.reshape(-1, 2), 0.5)
  return p_y1_Nx2, parsed


def average_orders(p_y1_Nx2: np.ndarray, judged_N: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """P(y1 better) averaged over orders, and whether both orders agree.

  Args:
    p_y1_Nx2: P(y1 better) in order 0 and in order 1.
    judged_N: whether the judge gave a verdict on each pair; one without
      gets 0.5 and no agreement.

  Returns:
    p_y1_N: the probability that y1 is better, averaged over both orders.
    agree_N: whether each order on its own prefers the same response.
  """
  p_y1_Nx2 = np.asarray(p_y1_Nx2, np.float64).reshape(-1, 2)
  judged = np.asarray(judged_N, bool)
  agree = judged & ((p_y1_Nx2[:, 0] > 0.5) == (p_y1_Nx2[:, 1] > 0.5))
  return np.where(judged, p_y1_Nx2.mean(axis=1), 0.5), agree


def identical(y1: str, y2: str) -> bool:
  """Whether two answers are the same (no preference between them exists)."""
  return y1.strip() == y2.strip()


@dataclasses.dataclass(frozen=True)
class Decision:
  """The outcome for one (y1, y2) pair: a winner (0 or 1) or a drop reason."""
  winner: int | None
  confidence: float
  reason: str | None


def decide(y1: str, y2: str, p_y1: float, agree: bool, threshold: float,
           no_verdict: str | None = None, require_agreement: bool = True
           ) -> Decision:
  """Keeps the pair or says why not (identical, no verdict, disagree, weak).

  `no_verdict` is the judge's reason for giving none (e.g. UNPARSABLE).
  `require_agreement=False` keeps order-inconsistent pairs on the averaged
  preference alone (for untrained models, whose letter bias dominates).
  """
  confidence = max(p_y1, 1.0 - p_y1)
  if identical(y1, y2):
    return Decision(None, confidence, IDENTICAL)
  if no_verdict is not None:
    return Decision(None, confidence, no_verdict)
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
