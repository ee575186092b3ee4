"""Judge aggregates, answer matching and length statistics."""
import re
import statistics

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors
import transformers

from isr_dpo_jax.eval import protocols
from isr_dpo_jax.eval import scoring
from isr_dpo_jax.eval import test_sets


def test_caption_grounded_summary_is_over_parsed_scores_failures_beside():
  verdicts = [protocols.CAPTION_GROUNDED.parse(f"Score: {s}") if s else
              protocols.CAPTION_GROUNDED.parse("no number")
              for s in ("5", "3", None, "2.5", "1", None)]
  summary = scoring.summarize_verdicts(verdicts)
  assert summary.parsed == 4 and summary.parse_failures == 2
  assert summary.accuracy == pytest.approx(2 / 4)  # 5 and 3 pass, 2.5 fails
  assert summary.mean_score == pytest.approx((5 + 3 + 2.5 + 1) / 4)
  assert scoring.summarize_verdicts(verdicts[2::3]) == scoring.ScoreSummary(
      None, None, 0, 2)


def test_video_chatgpt_summary_is_the_share_of_yes_and_the_mean_score():
  verdicts = [protocols.VIDEO_CHATGPT.parse(reply) for reply in (
      "{'pred': 'yes', 'score': 5}", "{'pred': 'no', 'score': 1}",
      "{'pred': 'yes', 'score': 4}", "{'pred': 'yes'}", "I cannot tell.")]
  summary = scoring.summarize_verdicts(verdicts)
  # "I cannot tell." holds "no" (in "cannot"): a "no" without a score.
  assert summary.accuracy == pytest.approx(3 / 5)
  assert summary.mean_score == pytest.approx((5 + 1 + 4) / 3)
  assert (summary.parsed, summary.parse_failures) == (3, 2)


@pytest.mark.parametrize("answer, prediction, exact, keyword", [
    ("red", "Red.", True, True),
    ("The red ball", "red ball", True, True),
    ("red", "The ball is red.", False, True),
    ("red ball", "The ball on the left is red.", False, True),
    ("red", "The ball is reddish.", False, False),
    ("two cubes", "There are 2 cubes.", False, False),
    ("", "anything", False, False),
])
def test_matching(answer, prediction, exact, keyword):
  assert scoring.exact_match(prediction, answer) == exact
  assert scoring.keyword_match(prediction, answer) == keyword


def test_match_accuracy_uses_the_injected_checker():
  records = [test_sets.QARecord(id=str(i), video="v", question="q",
                                answer=answer, caption="c", line=i + 1)
             for i, answer in enumerate(["red", "blue", "blue"])]
  assert scoring.match_accuracy(records, ["red", "red", "Blue!"]) == 2 / 3
  assert scoring.match_accuracy(
      records, ["x", "y", "z"], checker=lambda p, a: a == "blue") == 2 / 3


@pytest.mark.parametrize("seed", range(3))
def test_length_stats_match_the_statistics_module(seed):
  lengths = np.random.default_rng(seed).integers(0, 200, size=37).tolist()
  stats = scoring.length_stats(lengths)
  assert stats.mean == pytest.approx(statistics.fmean(lengths))
  assert stats.median == pytest.approx(statistics.median(lengths))
  p90 = statistics.quantiles(lengths, n=10, method="inclusive")[-1]
  assert stats.p90 == pytest.approx(p90)
  assert scoring.length_stats([]) is None


def test_word_and_token_counts():
  texts = ["A dog runs.", "  two\nlines here ", "It's 3 o'clock!"]
  assert scoring.word_counts(texts) == [3, 3, 3]
  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
  backend = tokenizers.Tokenizer(models.WordLevel(
      {w: i for i, w in enumerate(["[UNK]", "[BOS]"] + words)},
      unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  # Adds a BOS token, which is not part of an answer's length.
  backend.post_processor = processors.TemplateProcessing(
      single="[BOS] $A", special_tokens=[("[BOS]", 1)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")
  expected = [len(re.findall(r"\w+|[^\w\s]+", t)) for t in texts]
  assert expected == [4, 3, 8]  # It ' s 3 o ' clock !
  assert scoring.token_counts(texts, tokenizer) == expected
