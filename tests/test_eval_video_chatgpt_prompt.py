"""The Video-ChatGPT-style judge against LLaVA-Hound-DPO's published script.

ORIGINAL_* are quoted from github.com/RifleZhang/LLaVA-Hound-DPO,
llava_hound_dpo/test/eval/eval_official_qa.py (commit ec2381f), as they stand
in the source: triple-quoted with surrounding newlines, braces doubled where
`str.format` fills the template, trailing spaces kept (written out as "\n"
joins here so that no editor can strip them). The script passes both through
`format_docstring` (llava_hound_dpo/data_processing/utils.py), which removes
indentation after newlines and strips the ends: `_format_docstring` below.
"""
import re

import pytest

from isr_dpo_jax.eval import protocols
from isr_dpo_jax.eval import test_sets
from isr_dpo_jax.eval import video_chatgpt_prompt

ORIGINAL_PROMPT_TEMPLATE = "\n".join([
    "",
    "Please evaluate the following video-based question-answer pair:",
    "",
    "Question: {question}",
    "Correct Answer: {answer}",
    "Predicted Answer: {prediction}",
    "",
    "Provide your evaluation only as a yes/no and score where the score is an "
    "integer value between 0 and 5, with 5 indicating the highest meaningful "
    "match. ",
    "Please generate the response in the form of a Python dictionary string "
    "with keys 'pred' and 'score', where value of 'pred' is a string of 'yes' "
    "or 'no' and value of 'score' is in INTEGER, not STRING.",
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the "
    "Python dictionary string. ",
    "For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}.",
    "",
])

ORIGINAL_SYSTEM_PROMPT_TEMPLATE = "\n".join([
    "",
    "You are an intelligent chatbot designed for evaluating the correctness of "
    "generative outputs for question-answer pairs. ",
    "Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the "
    "task:",
    "------",
    "##INSTRUCTIONS: ",
    "- Focus on the meaningful match between the predicted answer and the "
    "correct answer.",
    "- Consider synonyms or paraphrases as valid matches.",
    "- Evaluate the correctness of the prediction compared to the answer.",
    "",
])


def _format_docstring(text):
  return re.sub("\n +", "\n", text).strip()


def test_system_message_is_the_published_one_word_for_word():
  assert video_chatgpt_prompt.SYSTEM_PROMPT == _format_docstring(
      ORIGINAL_SYSTEM_PROMPT_TEMPLATE)
  assert protocols.VIDEO_CHATGPT.system == video_chatgpt_prompt.SYSTEM_PROMPT


def test_user_message_is_the_published_one_with_the_prediction_cut():
  fields = dict(question="What does the man slice?", answer="Bread.",
                prediction="He slices {a loaf} of bread.")
  assert video_chatgpt_prompt.user_message(**fields) == _format_docstring(
      ORIGINAL_PROMPT_TEMPLATE).format(**fields)
  long_prediction = " ".join(f"w{i}" for i in range(300))
  message = video_chatgpt_prompt.user_message(
      question="q", answer="a", prediction=long_prediction)
  kept = " ".join(f"w{i}" for i in range(256))
  assert f"Predicted Answer: {kept}\n" in message and "w256" not in message
  assert message.endswith(
      "your response should look like this: {'pred': 'yes', 'score': 4.8}.")


def test_the_protocol_puts_no_caption_in_the_message():
  record = test_sets.QARecord(id="1", video="v", question="Why?",
                              answer="Because.", caption="SECRET", line=1)
  message = protocols.VIDEO_CHATGPT.user_message(record, "No idea.")
  assert "SECRET" not in message
  assert ("Question: Why?\nCorrect Answer: Because.\nPredicted Answer: No idea."
          in message)


@pytest.mark.parametrize("reply, correct, score", [
    ("{'pred': 'yes', 'score': 4}", True, 4),
    ('{"pred": "no", "score": 2}', False, 2),
    ("{'pred':'yes','score':5}", True, 5),
    ("Sure: {'pred': 'no', 'score': 0}", False, 0),
    # As published: the digits before a decimal point; a quoted value is none.
    ("{'pred': 'yes', 'score': 4.8}", True, 4),
    ("{'pred': 'no', 'score': '3'}", False, None),
    # A "score" key needs the same quotes on both sides.
    ("{'pred': 'yes', \"score': 3}", True, None),
    # The verdict is any "yes" in the reply, else any "no".
    ("{'pred': 'no', 'score': 1, 'note': 'Yes-like'}", True, 1),
    ("I cannot evaluate this.", False, None),
    ("Unable to evaluate.", None, None),
])
def test_replies_are_read_as_published(reply, correct, score):
  assert video_chatgpt_prompt.parse_verdict(reply) == correct
  assert video_chatgpt_prompt.parse_score(reply) == score
  assert protocols.VIDEO_CHATGPT.parse(reply) == protocols.Verdict(
      correct, score)


def test_unknown_protocols_are_listed():
  with pytest.raises(ValueError, match="caption_grounded.*video_chatgpt"):
    protocols.get("gpt4v")
