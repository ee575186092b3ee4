"""Conversation templates against the lineage's literal strings."""
import pytest

from isr_dpo_jax.data import templates

# github.com/RifleZhang/LLaVA-Hound-DPO, llava_hound_dpo/llava/conversation.py,
# conv_vicuna_v1: the Vicuna v1.1 / LLaVA "TWO" separator style.
SYSTEM = ("A chat between a curious user and an artificial intelligence "
          "assistant. The assistant gives helpful, detailed, and polite "
          "answers to the user's questions.")


def text(segments):
  return "".join(s.text for s in segments)


def test_vicuna_v1_prompt_and_target_are_the_lineage_strings():
  segments = templates.get("vicuna_v1").render(
      [("What is he doing?", "Surfing.")])
  assert text(segments) == (
      SYSTEM + " USER: <video>\nWhat is he doing? ASSISTANT: Surfing.</s>")
  assert [s.text for s in segments if s.is_target] == [" Surfing.</s>"]
  assert templates.get("vicuna_v1").prompt("What is he doing?") == (
      SYSTEM + " USER: <video>\nWhat is he doing? ASSISTANT:")


# github.com/snumprlab/isr-dpo, llava/conversation.py, conv_vicuna_v1_custom
# (commit 91331d5), word for word: no "detailed".
V1_CUSTOM_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, and polite answers to the user's questions. "
    "Answer the response within two sentences.")


def test_v1_custom_is_isr_dpos_system_text_word_for_word():
  prompt = templates.get("v1_custom").prompt("Why?")
  assert prompt == V1_CUSTOM_SYSTEM + " USER: <video>\nWhy? ASSISTANT:"


def test_multi_turn_separators():
  segments = templates.get("vicuna_v1").render(
      [("<video>\nQ1", "A1"), ("Q2", "A2"), ("Q3", None)])
  assert text(segments) == (SYSTEM + " USER: <video>\nQ1 ASSISTANT: A1</s>"
                            "USER: Q2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:")
  assert [s.text for s in segments if s.is_target] == [" A1</s>", " A2</s>"]


@pytest.mark.parametrize("question", [
    "<video>\nWhat is it?", "What is it?", "What is it? <video>",
    "  <video>What is it?\n"])
def test_video_placeholder_goes_first_once(question):
  prompt = templates.get("vicuna_v1").prompt(question)
  assert prompt.endswith(" USER: <video>\nWhat is it? ASSISTANT:")
  assert prompt.count("<video>") == 1


def test_text_only_prompt_has_no_placeholder():
  prompt = templates.get("vicuna_v1").prompt("Hi?", with_video=False)
  assert prompt == SYSTEM + " USER: Hi? ASSISTANT:"


@pytest.mark.parametrize("turns", [
    [("Q1", "A1"), ("Q2 <video>", "A2")],
    [("Q1", "an answer with <video>")],
    [("Q1", None), ("Q2", "A2")],
])
def test_malformed_conversations_raise(turns):
  with pytest.raises(ValueError):
    templates.get("vicuna_v1").render(turns)


def test_configs_add_templates_and_unknown_names_are_listed():
  custom = templates.resolve({"name": "test_chatml_like", "system": "Sys.",
                              "roles": ["Human", "Bot"], "sep": "\n",
                              "sep2": "<eot>"})
  assert templates.resolve("test_chatml_like") is custom
  assert custom.prompt("Q") == "Sys.\nHuman: <video>\nQ\nBot:"
  assert text(custom.render([("Q", "A")], with_video=False)).endswith(
      "Bot: A<eot>")
  with pytest.raises(KeyError, match="vicuna_v1"):
    templates.get("no_such_template")
