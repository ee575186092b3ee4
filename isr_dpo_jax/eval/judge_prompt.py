"""The caption-grounded 1-5 answer judge of the ISR-DPO evaluation protocol.

The prompt is the published one, word for word: ISR-DPO's
`Evaluation/eval/eval_qa.sh` (github.com/snumprlab/isr-dpo) runs the
`test/eval/eval_qa.py` of LLaVA-Hound-DPO, whose `PROMPT_TEMPLATE`
(github.com/RifleZhang/LLaVA-Hound-DPO, dpo_experiment/test/eval/eval_qa.py)
is reproduced below. There it goes through `format_docstring` (which strips the
surrounding newlines) and is sent as the only, user, message, with no system
prompt, to gpt-3.5-turbo-0301 at temperature 0. The prediction is cut to its
first 256 words (`maybe_truncate`) and the reply is parsed by `get_score`
(llava_hound_dpo/inference/utils.py), whose grammar `parse_score` keeps, except
that a reply without any number is a parse failure here instead of a score of 1.
"""
import collections
import re

PROMPT_TEMPLATE = """
Given the following inputs:

1. **Ground Truth Video Caption**: {caption}
2. **Question Related to the Caption**: {question}
3. **Ground Truth Answer**: {answer}
4. **Model Predicted Answer**: {prediction}

Your task is to evaluate the model's predicted answer against the ground truth answer, based on the context provided by the video caption and the question. Consider the following criteria for evaluation:

- **Relevance**: Does the predicted answer directly address the question posed, considering the information provided in the video caption?
- **Accuracy**: Compare the predicted answer to the ground truth answer. Does the prediction accurately reflect the information given in the ground truth answer without introducing factual inaccuracies?
- **Clarity**: Assess the clarity of the predicted answer. Look for issues such as repetition, unclear descriptions, or any grammatical errors that could hinder understanding.
- **Completeness**: Determine if the predicted answer fully covers the scope of the ground truth answer. Does it leave out critical information or does it include all necessary details?

**Output Format**:
Explanation: <brief judgement of prediction>
Score: <an integer score of quality from 1-5>
""".strip()

MAX_PREDICTION_WORDS = 256
PASSING_SCORE = 3.0

_SCORE_RE = re.compile(r"Score: (\d+\.?\d*)")
_NUMBER_RE = re.compile(r"\b\d+\.?\d*\b")


def truncate_words(text: str, max_words: int = MAX_PREDICTION_WORDS) -> str:
  """First `max_words` whitespace-separated words; short texts stay as they are."""
  words = text.split()
  if len(words) > max_words:
    return " ".join(words[:max_words])
  return text


def judge_prompt(*, caption: str, question: str, answer: str,
                 prediction: str) -> str:
  """The judge's user message for one answered test question."""
  return PROMPT_TEMPLATE.format(
      caption=caption, question=question, answer=answer,
      prediction=truncate_words(prediction))


def parse_score(reply: str) -> float | None:
  """The judge's score, or None when the reply holds no number.

  Grammar (as published): the number after the first "Score: " (case and the
  single space matter; decimals allowed); otherwise the most frequent of the
  word-delimited numbers in the reply, ties averaged; otherwise no score.
  Values are not range-checked, as published.
  """
  if match := _SCORE_RE.search(reply):
    return float(match.group(1))
  counts = collections.Counter(float(n) for n in _NUMBER_RE.findall(reply))
  if not counts:
    return None
  top = max(counts.values())
  tied = [value for value, count in counts.items() if count == top]
  return sum(tied) / len(tied)
