"""The loop's judges: which of two sampled answers the policy learns to prefer.

Every judge answers one question about a batch of pairs (y1, y2), two answers
to a question about a video: P(y1 better) in each order of the judging
protocol (judge.judge_questions: order 0 shows y1 as "Response A", order 1
shows y2), or the reason it gives no verdict. The judgments stage then
averages the orders and decides (judge.average_orders, judge.decide) alike
for every judge, so a new judge is one class here, its line in JUDGES and its
name in judge.MODES (which config validation reads without importing jax).

  likelihood    pi_t's next-token odds of the letters A and B
  generative    pi_t writes a verdict, parsed by judge.parse_verdict
  ground_truth  the synthetic world's answers (the positive control)

judge.py holds the protocol (wording, order arithmetic, decisions); this
module holds who applies it, which needs the policy or the world's files.
"""
from collections.abc import Callable, Sequence
import dataclasses
import pathlib
from typing import Protocol

import ml_collections
import numpy as np

from isr_dpo_jax import generate
from isr_dpo_jax import judge
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import sampling
from isr_dpo_jax import settings
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two answers to one question about a video, and what a judge may use."""
  id: str
  video: str  # its name in the prompts file
  question: str
  responses: tuple[str, str]  # (y1, y2)
  context: str | None  # c_t(V); None when judging without context
  orders: tuple[str, str]  # the judge question, y1 shown first, then y2
  pixels: np.ndarray  # float32 [T, S, S, 3]


@dataclasses.dataclass(frozen=True)
class Verdicts:
  """A judge's findings on N pairs.

  Attributes:
    p_y1_Nx2: P(y1 better) in order 0 and in order 1 (an order-blind judge
      gives the same twice).
    no_verdict: per pair, why the judge gives no verdict (a drop reason
      counted in the summary), or None.
    evidence: per pair, what the verdict rests on, JSON-ready: it is the
      judgment record's "raw".
    tokens: the tokens of the judge's kind (Judge.token_kind) that its model
      handled for these pairs: the stage's tokens/s.
  """
  p_y1_Nx2: np.ndarray
  no_verdict: list[str | None]
  evidence: list
  tokens: int


class Judge(Protocol):
  """Judges pairs; a class is built per iteration as

    cls(config, policy, seed, ground_truth)

  from the run's config, pi_t, the iteration's seed and the synthetic
  world's ground_truth.jsonl (None on other data). It is called on every
  process, on that process's pairs of each batch, possibly none.

  `token_kind` says what Verdicts.tokens counts: "prompt" tokens read or
  "generated" tokens written by the policy ("" for a judge without a model).
  """
  token_kind: str

  def __call__(self, pairs: Sequence[Pair]) -> Verdicts:
    ...


def _distinct(pairs: Sequence[Pair], judge_fn: Callable[[list[Pair]], Verdicts]
              ) -> Verdicts:
  """judge_fn's verdicts on the pairs whose answers differ; pairs of identical
  answers get none (judge.IDENTICAL, p = 0.5, no evidence) and cost no pass.

  judge_fn is called even on no pairs: on several processes, all run the model.
  """
  distinct = [i for i, p in enumerate(pairs) if not judge.identical(*p.responses)]
  found = judge_fn([pairs[i] for i in distinct])
  p_y1_Nx2 = np.full((len(pairs), 2), 0.5)
  p_y1_Nx2[distinct] = found.p_y1_Nx2
  no_verdict, evidence = [judge.IDENTICAL] * len(pairs), [None] * len(pairs)
  for i, reason, raw in zip(distinct, found.no_verdict, found.evidence, strict=True):
    no_verdict[i], evidence[i] = reason, raw
  return Verdicts(p_y1_Nx2, no_verdict, evidence, found.tokens)


class Likelihood:
  """pi_t's next-token probabilities of A and B after each order: one pass
  per pair, whose orders share the run of their common start (the video,
  context and question)."""
  token_kind = "prompt"

  def __init__(self, config, policy: policy_lib.Policy, seed: int, ground_truth):
    del config, seed, ground_truth  # unused
    self.policy = policy
    self.letters = policy.letter_ids("AB")

  def __call__(self, pairs: Sequence[Pair]) -> Verdicts:
    return _distinct(pairs, self._judge)

  def _judge(self, pairs: list[Pair]) -> Verdicts:
    logps = self.policy.next_token_logprobs(
        [p.orders for p in pairs], [p.pixels for p in pairs], self.letters,
        per_video=2)
    logps_Nx2x2 = logps.reshape(-1, 2, 2)
    tokens = sum(len(self.policy.encoder.prompt(q)) for p in pairs for q in p.orders)
    return Verdicts(judge.letter_preferences(logps_Nx2x2), [None] * len(pairs),
                    logps_Nx2x2.tolist(), tokens)


class Generative:
  """pi_t writes a verdict per order, greedily, the orders sharing the run of
  their common start; one naming no single response is unparsable, never
  guessed."""
  token_kind = "generated"

  def __init__(self, config, policy: policy_lib.Policy, seed: int, ground_truth):
    del ground_truth  # unused
    self.policy, self.seed = policy, seed
    self.params = sampling.SamplingParams(temperature=0.0,
                                          max_new_tokens=config.self_judge.max_new_tokens)

  def __call__(self, pairs: Sequence[Pair]) -> Verdicts:
    return _distinct(pairs, self._judge)

  def _judge(self, pairs: list[Pair]) -> Verdicts:
    uids = [generate.stable_uid("verdict", p.id) for p in pairs]
    samples = [s for both in self.policy.sample(
        [p.orders for p in pairs], [p.pixels for p in pairs], uids, self.params,
        num_samples=2, seed=self.seed) for s in both]
    texts = [s.text for s in samples]
    letters = [judge.parse_verdict(t) for t in texts]
    p_y1_Nx2, parsed = judge.verdict_preferences(list(zip(letters[0::2], letters[1::2])))
    return Verdicts(p_y1_Nx2, [None if ok else judge.UNPARSABLE for ok in parsed],
                    [list(t) for t in zip(texts[0::2], texts[1::2])],
                    sum(s.length for s in samples))


# Why the ground truth gives no verdict on a pair.
BOTH_CORRECT = "both_correct"
NEITHER_CORRECT = "neither_correct"
NO_GROUND_TRUTH = "no_ground_truth"  # a question the world does not ask


def world_answers(ground_truth: pathlib.Path) -> dict[tuple[str, str], str]:
  """{(video, question): canonical answer} of a synthetic world's ground truth."""
  return {(clip["video"], qa["question"]): qa["answer"]
          for clip in records.load_jsonl(ground_truth)
          for qa in clip["qa"]}


class GroundTruth:
  """The synthetic world's answers as the judge: the positive control.

  Prefers the response that gives the question's answer by the world's rule
  (scenes.answer_is_correct, as evaluation scores answers); a pair where
  both or neither do gets no verdict. The pairs, DPO and evaluation are the
  self-judge's; only the verdicts differ, so a loop that does not improve
  under this judge has a fault in its machinery, not in its judge. It exists
  only where ground truth does: on the synthetic world (config.world).
  """
  token_kind = ""  # no model

  def __init__(self, config, policy, seed: int, ground_truth: pathlib.Path | None):
    del config, policy, seed  # unused
    if ground_truth is None:
      raise settings.ConfigError(settings.GROUND_TRUTH_WITHOUT_WORLD)
    self.answers = world_answers(ground_truth)

  def __call__(self, pairs: Sequence[Pair]) -> Verdicts:
    p_y1, no_verdict, evidence = [], [], []
    for pair in pairs:
      answer = self.answers.get((pair.video, pair.question))
      correct = [answer is not None and scenes.answer_is_correct(y, answer)
                 for y in pair.responses]
      p_y1.append(0.5 if correct[0] == correct[1] else float(correct[0]))
      no_verdict.append(NO_GROUND_TRUTH if answer is None else
                        BOTH_CORRECT if all(correct) else
                        NEITHER_CORRECT if not any(correct) else None)
      evidence.append(dict(answer=answer, correct=correct))
    return Verdicts(np.repeat(np.array(p_y1, np.float64)[:, None], 2, axis=1),
                    no_verdict, evidence, tokens=0)


# config.self_judge.mode -> judge; the same names as judge.MODES.
JUDGES: dict[str, type[Judge]] = {
    "likelihood": Likelihood,
    "generative": Generative,
    "ground_truth": GroundTruth,
}


def make(config: ml_collections.ConfigDict, policy: policy_lib.Policy, seed: int,
         ground_truth: pathlib.Path | None = None) -> Judge:
  """The judge that config.self_judge.mode names; a ConfigError for an unknown name."""
  mode = config.self_judge.mode
  if mode not in JUDGES:
    raise settings.ConfigError(
        f"self_judge.mode={mode!r}: must be one of {', '.join(JUDGES)}")
  return JUDGES[mode](config, policy, seed, ground_truth)
