"""The demo's SFT data, built from the synthetic world's ground truth.

Stage 1 (alignment): one caption per training clip. Stage 2: the mix of
descriptions, revisions, QA pairs and judge examples with step-by-step
verdicts; isr_dpo_jax/demo.py's doc says why each is there.
"""
import pathlib
import re

import numpy as np

from isr_dpo_jax import judge
from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes


def _record(clip: dict, question: str, answer: str, index: int,
            video: str | None = None) -> dict:
  """An instruction record of `clip` (shown `video`, if given, instead)."""
  return {"id": f"{clip['id']}_sft{index}", "video": video or clip["video"],
          "conversations": scenes.turns(question, answer)}


def training_clips(ground_truth: pathlib.Path, limit: int | None = None) -> list[dict]:
  """The ground truth's training clips in file order, the first `limit` if given."""
  clips = [c for c in records.load_jsonl(ground_truth) if c["split"] == "train"]
  return clips[:limit]


def write_captions(ground_truth: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """Stage 1's data: one caption record per training clip."""
  clips = training_clips(ground_truth)
  records.write_jsonl(path, [_record(c, scenes.CAPTION_PROMPT, c["caption"], i)
                             for i, c in enumerate(clips)])
  return path


def write_sft_mix(ground_truth: pathlib.Path, prompts: judge.Prompts, cfg,
                  seed: int, path: pathlib.Path) -> pathlib.Path:
  """Stage 2's instruction records, on the first `cfg.mix_clips` training
  clips (see isr_dpo_jax/demo.py's doc)."""
  rng = np.random.default_rng(seed)
  clips = training_clips(ground_truth, cfg.mix_clips)
  out = []

  def add(clip, question, answer, video=None):
    out.append(_record(clip, question, answer, len(out), video))

  for clip in clips:
    add(clip, prompts.first_context, clip["description"])
    if rng.random() < cfg.revision_share:
      add(clip, judge.context_question(prompts, corrupt(clip["description"], rng)),
          clip["description"])
    for qa in clip["qa"]:
      if rng.random() < cfg.qa_share:
        add(clip, qa["question"], qa["response"])
      if rng.random() < cfg.judge_share:
        shows_context = rng.random() < cfg.judge_context_share
        # Shown another clip's video, only the description answers: the
        # judge has to read it (the true video lets it look instead).
        foreign = shows_context and rng.random() < cfg.judge_foreign_video_share
        add(clip, *judge_example(clip, qa, prompts, shows_context, rng),
            clips[rng.integers(len(clips))]["video"] if foreign else None)
  records.write_jsonl(path, out)
  return path


def corrupt(text: str, rng: np.random.Generator) -> str:
  """`text` with one world word (colour, shape, count, ...) replaced by another."""
  spots = [m for m in re.finditer(r"[a-z]+", text) if scenes.alternatives(m[0])]
  spot = spots[rng.integers(len(spots))]
  wrong = rng.choice(scenes.alternatives(spot[0]))
  return text[:spot.start()] + wrong + text[spot.end():]


def judge_example(clip: dict, qa: dict, prompts: judge.Prompts, shows_context: bool,
                  rng: np.random.Generator) -> tuple[str, str]:
  """A judge question between the true response and a wrong one, and its
  step-by-step verdict (see isr_dpo_jax/demo.py's doc)."""
  wrong_word = str(rng.choice(scenes.alternatives(qa["answer"])))
  wrong = re.sub(rf"\b{qa['answer']}\b", wrong_word, qa["response"])
  context = clip["description"] if shows_context else None
  true_first = bool(rng.random() < 0.5)
  a, b = (qa["response"], wrong) if true_first else (wrong, qa["response"])
  words = (qa["answer"], wrong_word) if true_first else (wrong_word, qa["answer"])
  return (judge.judge_question(prompts, qa["question"], a, b, context),
          verdict(clip["description"], *words, "A" if true_first else "B"))


def verdict(description: str, word_a: str, word_b: str, letter: str) -> str:
  """"red: yes. blue: no. Answer A": whether the description shows each
  response's answer word, then the true response's letter."""
  shown = lambda word: "yes" if scenes.mentions(description.lower(), word) else "no"
  return f"{word_a}: {shown(word_a)}. {word_b}: {shown(word_b)}. Answer {letter}"
