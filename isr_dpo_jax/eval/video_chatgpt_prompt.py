"""The Video-ChatGPT-style yes/no answer judge of LLaVA-Hound-DPO's table.

LLaVA-Hound-DPO's published MSVD, MSRVTT and TGIF numbers (88.50/4.20,
82.10/3.84 and 75.48/3.81 under gpt-3.5-turbo-0301) come from
`llava_hound_dpo/test/eval/eval_official_qa.py`
(github.com/RifleZhang/LLaVA-Hound-DPO), run by
`test/pipeline/outdomain_official_test_pipeline.sh` on the
`{msvd,msrvtt,tgif}.qa.official.jsonl` test files. It follows Video-ChatGPT's
evaluation: `SYSTEM_PROMPT` as the system message and `PROMPT_TEMPLATE` as the
user message, both reproduced below word for word as `format_docstring` leaves
them (surrounding newlines stripped, trailing spaces kept), at temperature 0.
The judge sees no caption. The prediction is cut to its first 256 words, as
in the caption-grounded protocol. The reply is a Python dict string,
`{'pred': 'yes' or 'no', 'score': 0-5}`, read as published: `parse_score` is
its `extract_score`, `parse_verdict` its yes/no count.
"""
import re

from isr_dpo_jax.eval import judge_prompt

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of "
    "generative outputs for question-answer pairs. \n"
    "Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the "
    "task:\n"
    "------\n"
    "##INSTRUCTIONS: \n"
    "- Focus on the meaningful match between the predicted answer and the "
    "correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer.")

PROMPT_TEMPLATE = (
    "Please evaluate the following video-based question-answer pair:\n"
    "\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n"
    "\n"
    "Provide your evaluation only as a yes/no and score where the score is an "
    "integer value between 0 and 5, with 5 indicating the highest meaningful "
    "match. \n"
    "Please generate the response in the form of a Python dictionary string "
    "with keys 'pred' and 'score', where value of 'pred' is a string of 'yes' "
    "or 'no' and value of 'score' is in INTEGER, not STRING.\n"
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the "
    "Python dictionary string. \n"
    "For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}.")

_SCORE_RE = re.compile(r"'score'\s*:\s*(\d+)|\"score\"\s*:\s*(\d+)")


def user_message(*, question: str, answer: str, prediction: str) -> str:
  """The judge's user message for one answered test question."""
  return PROMPT_TEMPLATE.format(
      question=question, answer=answer,
      prediction=judge_prompt.truncate_words(prediction))


def parse_score(reply: str) -> int | None:
  """The integer after the first 'score' key, in either quotes; else None.

  As published, only the digits before any decimal point count ("4.8" is 4)
  and a quoted value ("'4'") is no score.
  """
  if match := _SCORE_RE.search(reply):
    return int(next(group for group in match.groups() if group is not None))
  return None


def parse_verdict(reply: str) -> bool | None:
  """True if "yes" is anywhere in the reply, else False if "no" is, else None.

  The published rule reads the whole reply, not only the dict's 'pred' value;
  on the dict replies the prompt asks for, the two agree.
  """
  text = reply.lower()
  if "yes" in text:
    return True
  if "no" in text:
    return False
  return None
