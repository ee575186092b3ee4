"""The policy's judges against judging each order on its own (the judge before
the orders shared a prefill): the same preferences, with fewer passes."""
import json

import numpy as np
import pytest

import conftest
import tolerance
from isr_dpo_jax import bootstrap
from isr_dpo_jax import generate
from isr_dpo_jax import judge
from isr_dpo_jax import judges
from isr_dpo_jax import parallel
from isr_dpo_jax import policy as policy_lib
from isr_dpo_jax import sampling
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes


@pytest.fixture(name="smoke", scope="module")
def smoke_fixture(tmp_path_factory):
  """configs/smoke.py's pi_0 and 12 pairs on its prompts: right then wrong,
  wrong then right, or the same answer twice; every other one with a context."""
  config = conftest.load_config("smoke")
  setup = bootstrap.prepare(config, tmp_path_factory.mktemp("smoke"))
  policy = policy_lib.Policy.from_config(config, setup,
                                         parallel.make_mesh(dict(config.mesh)))
  prompts = [json.loads(line) for line in setup.prompts.read_text().splitlines()]
  pairs = []
  for i, record in enumerate(prompts[:12]):
    (question, answer), = records.conversation_turns(record["conversations"])
    question = question.replace("<video>", "").strip()
    right, wrong = f"It is {answer}.", f"It is {scenes.alternatives(answer)[0]}."
    y1, y2 = [(right, wrong), (wrong, right), (right, right)][i % 3]
    context = "A red square moves left." if i % 2 else None
    pairs.append(judges.Pair(
        record["id"], record["video"], question, (y1, y2), context,
        judge.judge_questions(judge.Prompts(), question, y1, y2, context),
        policy.video(record["video"])))
  return config, policy, pairs


def _each_order_alone(policy, pairs, mode, config):
  """What the judge found before: each order a prompt of its own, with its
  own video, and identical pairs judged too."""
  questions = [q for p in pairs for q in p.orders]
  frames = [p.pixels for p in pairs for _ in p.orders]
  if mode == "likelihood":
    return policy.next_token_logprobs(questions, frames, policy.letter_ids("AB")
                                      ).reshape(-1, 2, 2)
  uids = [generate.stable_uid("verdict", p.id, o) for p in pairs for o in (0, 1)]
  params = sampling.SamplingParams(temperature=0.0,
                                   max_new_tokens=config.self_judge.max_new_tokens)
  texts = [s.text for s, in policy.sample(questions, frames, uids, params, seed=7)]
  return [list(t) for t in zip(texts[0::2], texts[1::2])]


def _decisions(pairs, verdicts, config):
  p_y1, agree = judge.average_orders(verdicts.p_y1_Nx2,
                                     [r is None for r in verdicts.no_verdict])
  return [(judge.decide(*pair.responses, p, a, config.self_judge.threshold, reason,
                        config.self_judge.require_agreement), p, a)
          for pair, p, a, reason in zip(pairs, p_y1, agree, verdicts.no_verdict)]


@pytest.mark.parametrize("mode", ["likelihood", "generative"])
def test_shared_orders_and_skipped_identical_pairs_keep_the_judge_s_preferences(
    smoke, mode, monkeypatch):
  config, policy, pairs = smoke
  config = conftest.load_config("smoke", **{"self_judge.mode": mode})
  before = _each_order_alone(policy, pairs, mode, config)
  if mode == "likelihood":
    old = judges.Verdicts(judge.letter_preferences(before), [None] * len(pairs),
                          before.tolist(), 0)
  else:
    p_y1_Nx2, parsed = judge.verdict_preferences(
        [tuple(map(judge.parse_verdict, texts)) for texts in before])
    old = judges.Verdicts(p_y1_Nx2, [None if ok else judge.UNPARSABLE for ok in parsed],
                          before, 0)
  videos = []  # the videos each pass of the model encodes
  score, prefill = policy.sampler._score, policy.sampler._prefill
  monkeypatch.setattr(policy.sampler, "_score",
                      lambda state, ids, mask, v, *a: videos.append(v) or score(state, ids, mask, v, *a))
  monkeypatch.setattr(policy.sampler, "_prefill",
                      lambda state, ids, mask, v, *a, **k: videos.append(v) or prefill(state, ids, mask, v, *a, **k))
  verdicts = judges.make(config, policy, 7)(pairs)

  distinct = [i for i, p in enumerate(pairs) if not judge.identical(*p.responses)]
  assert 0 < len(distinct) < len(pairs)
  assert sum(len(v) for v in videos) == -(-len(distinct) // policy.batch_size) * policy.batch_size
  got, want = _decisions(pairs, verdicts, config), _decisions(pairs, old, config)
  for i, ((d, p, a), (d_old, p_old, a_old)) in enumerate(zip(got, want)):
    assert (d.winner, d.reason) == (d_old.winner, d_old.reason)
    if i in distinct:
      assert a == a_old
      tolerance.assert_close(p, p_old, scale=1.0)
    else:
      assert (verdicts.no_verdict[i], verdicts.evidence[i], p) == (judge.IDENTICAL, None, 0.5)
  evidence = [verdicts.evidence[i] for i in distinct]
  if mode == "likelihood":
    tolerance.assert_close(evidence, [old.evidence[i] for i in distinct])
  else:
    assert evidence == [old.evidence[i] for i in distinct]


def test_a_batch_of_identical_pairs_runs_no_model(smoke, monkeypatch):
  config, policy, pairs = smoke
  same = [p for p in pairs if judge.identical(*p.responses)]
  monkeypatch.setattr(policy.sampler, "_score", None)  # any pass would fail
  monkeypatch.setattr(policy.sampler, "_prefill", None)
  for mode in ("likelihood", "generative"):
    config = conftest.load_config("smoke", **{"self_judge.mode": mode})
    verdicts = judges.make(config, policy, 7)(same)
    assert verdicts.no_verdict == [judge.IDENTICAL] * len(same)
    assert verdicts.tokens == 0
