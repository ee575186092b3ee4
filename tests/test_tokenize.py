"""Tokenisation: whole-conversation ids, answer labels, video runs, truncation.

References: Hugging Face's Video-LLaVA processor expands the placeholder in
the text before tokenising, so our ids must equal tokenising the text with
the placeholder repeated; the labelled tokens must spell exactly the answer
texts of the template. Tiny tokenizers are trained offline: LLaMA-style
(SentencePiece-like, with and without transformers' legacy behaviour) and
GPT-2-style byte-level BPE.
"""
import numpy as np
import pytest
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import Tokenizer
from tokenizers import trainers
import transformers

from isr_dpo_jax.data import records
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.world import vocab

CORPUS = [
    templates.VICUNA_SYSTEM,
    "USER: What is the man doing? ASSISTANT: The man is riding a red bicycle.",
    "What color is the ball? The ball is blue. How many cats are there?",
    "Two cats sit on a mat. A dog runs to the left, then jumps.",
]
NUM_VIDEO = 5
VIDEO_ID = 10_000  # Outside the vocabulary, as the original layout's -201 is.
VICUNA = templates.get("vicuna_v1")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<video>"]


def byte_level_tokenizer():
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single="<s> $A",
                                    special_tokens=[("<s>", 1)])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>", unk_token="<unk>",
      additional_special_tokens=["<video>"])


TOKENIZERS = {
    "llama": lambda: vocab.train_tokenizer(CORPUS),
    "llama_legacy": lambda: vocab.train_tokenizer(CORPUS, legacy=True),
    "byte_level": byte_level_tokenizer,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
  return TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def llama():
  return TOKENIZERS["llama"]()


def encoder(tokenizer, **kwargs):
  return tokenize.TextEncoder(tokenizer, VICUNA, video_token_id=VIDEO_ID,
                              num_video_tokens=NUM_VIDEO, **kwargs)


def token_text(tokenizer, ids):
  pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
  return "".join(pieces).replace("\u2581", " ").replace("\u0120", " ")


TURNS = [
    ("<video>\nWhat is the man doing?", "The man is riding a red bicycle."),
    ("How many cats are there?", "Two cats."),
]


def test_ids_equal_hf_processor_expansion(tokenizer):
  """Expanding after tokenising == repeating the placeholder in the text."""
  text = "".join(s.text for s in VICUNA.render(TURNS))
  expanded = text.replace("<video>", "<video>" * NUM_VIDEO)
  expected = tokenizer(expanded)["input_ids"]
  video_id = tokenizer.convert_tokens_to_ids("<video>")
  enc = tokenize.TextEncoder(tokenizer, VICUNA, video_id, NUM_VIDEO)
  ids, labels = enc.encode(TURNS)
  np.testing.assert_array_equal(ids, expected)
  assert ids.dtype == np.int32 and ids[0] == tokenizer.bos_token_id
  assert (ids == video_id).sum() == NUM_VIDEO
  assert not labels[ids == video_id].any()


def test_labels_spell_the_answers_with_their_eos(tokenizer):
  ids, labels = encoder(tokenizer).encode(TURNS)
  assert token_text(tokenizer, ids[labels]) == (
      " The man is riding a red bicycle.</s> Two cats.</s>")
  eos = np.flatnonzero(ids == tokenizer.eos_token_id)
  assert labels[eos].all() and len(eos) == 2
  # Labels form one run per answer, each ending at its eos.
  starts = np.flatnonzero(np.diff(labels.astype(int)) == 1) + 1
  ends = np.flatnonzero(np.diff(np.append(labels, False).astype(int)) == -1)
  assert len(starts) == 2 and list(ends) == list(eos)


def test_prompt_and_responses_concatenate_to_the_conversation(tokenizer):
  enc = encoder(tokenizer)
  question = "What is the man doing?"
  pair = enc.preference(question, "The man is riding.", "A dog runs.")
  np.testing.assert_array_equal(pair.prompt, enc.prompt(question))
  for response in ("The man is riding.", "A dog runs."):
    whole, labels = enc.encode([(question, response)])
    ids = pair.chosen if response.startswith("The") else pair.rejected
    np.testing.assert_array_equal(np.concatenate([pair.prompt, ids]), whole)
    assert labels[len(pair.prompt):].all() and ids[-1] == tokenizer.eos_token_id


def test_whole_text_tokenisation_differs_from_naive_concatenation():
  """The SentencePiece subtlety the offsets approach avoids."""
  legacy = TOKENIZERS["llama_legacy"]()
  pair = encoder(legacy).preference("What is the man doing?", "The man.", "No.")
  naive = legacy(" The man.</s>", add_special_tokens=False)["input_ids"]
  assert legacy.convert_ids_to_tokens(naive)[:2] == ["\u2581", "\u2581The"]
  assert legacy.convert_ids_to_tokens(pair.chosen.tolist())[0] == "\u2581The"


def test_sft_multi_turn_marks_only_answers(tokenizer):
  sft = encoder(tokenizer).sft(TURNS)
  assert token_text(tokenizer, sft.prompt[sft.prompt != VIDEO_ID]).endswith(
      "ASSISTANT:")
  assert sft.loss[0] and sft.loss[-1]
  assert token_text(tokenizer, sft.target[~sft.loss]).strip().startswith("USER")
  assert (sft.prompt == VIDEO_ID).sum() == NUM_VIDEO


def test_long_response_is_cut_at_its_end(llama):
  full = encoder(llama, max_length=4096).preference(
      "What?", "The man is riding a red bicycle to the left.", "No.")
  budget = len(full.prompt) + 6
  cut = encoder(llama, max_length=budget, min_response_tokens=4).preference(
      "What?", "The man is riding a red bicycle to the left.", "No.")
  np.testing.assert_array_equal(cut.prompt, full.prompt)
  np.testing.assert_array_equal(cut.chosen, full.chosen[:6])
  np.testing.assert_array_equal(cut.rejected, full.rejected)
  assert llama.eos_token_id not in cut.chosen


def test_too_long_examples_are_rejected_with_reasons(llama):
  prompt_len = len(encoder(llama).prompt("What?"))
  with pytest.raises(records.BadRecord) as e:
    encoder(llama, max_length=prompt_len + 3,
            min_response_tokens=4).prompt("What?")
  assert e.value.reason == "prompt_too_long"
  with pytest.raises(records.BadRecord) as e:
    # The video run alone overflows: never cut, the example is rejected.
    encoder(llama, max_length=NUM_VIDEO + 2, min_response_tokens=1).sft(TURNS)
  assert e.value.reason == "prompt_too_long"
  # Cut inside the second question: the first answer alone is too short, as
  # later questions are no answer tokens.
  turns = [("What?", "No."), (" ".join(["cats"] * 40) + "?", "Yes.")]
  first_answer = encoder(llama).sft(turns[:1]).target
  with pytest.raises(records.BadRecord) as e:
    encoder(llama, max_length=prompt_len + len(first_answer) + 4,
            min_response_tokens=len(first_answer) + 1).sft(turns)
  assert e.value.reason == "response_too_long"


def test_placeholders_are_checked(llama):
  with pytest.raises(records.BadRecord) as e:
    encoder(llama).sft([("Q1", "A1"), ("Q2 <video>", "A2")])
  assert e.value.reason == "bad_conversation"
  with pytest.raises(records.BadRecord) as e:
    encoder(llama).prompt("Say <video> here.", with_video=False)
  assert e.value.reason == "bad_conversation"
  template = templates.Template(name="video_in_system", system="<video> Hi.")
  with pytest.raises(records.BadRecord) as e:
    tokenize.TextEncoder(llama, template, VIDEO_ID, NUM_VIDEO).prompt("Q")
  assert e.value.reason == "bad_video_placeholder"


def test_tokenizer_without_video_token_needs_add_video_token():
  tok = vocab.train_tokenizer(CORPUS, extra_special_tokens=())
  with pytest.raises(ValueError, match="add_video_token"):
    encoder(tok)
  before = tok("The man is riding.")["input_ids"]
  video_id = tokenize.add_video_token(tok)
  assert video_id == len(tok) - 1
  assert tok("The man is riding.")["input_ids"] == before
  ids, _ = encoder(tok).encode(TURNS)
  assert (ids == VIDEO_ID).sum() == NUM_VIDEO


def test_token_across_the_answer_boundary_is_rejected():
  """A tokenizer that merges across spaces cannot split prompt from answer."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.train_from_iterator(["ASSISTANT: Yes</s>"] * 50, trainers.BpeTrainer(
      vocab_size=60, special_tokens=SPECIALS, show_progress=False))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", additional_special_tokens=["<video>"])
  template = templates.Template(name="bare", system="", sep="")
  enc = tokenize.TextEncoder(fast, template, VIDEO_ID, NUM_VIDEO)
  with pytest.raises(records.BadRecord) as e:
    enc.encode([("", "Yes")], with_video=False)
  assert e.value.reason == "token_crosses_answer_boundary"


def test_learnt_pieces_never_contain_a_special_token():
  corpus = ["USER: <video>\nWhat moves? ASSISTANT: The red square moves left.</s>"] * 50
  tok = vocab.train_tokenizer(corpus, vocab_size=600)
  pieces = [p for p in tok.get_vocab() if p not in tok.all_special_tokens]
  assert not [p for p in pieces if "<video>" in p or "</s>" in p]
  ids = tok("<video>\nWhat moves?")["input_ids"]
  assert ids.count(tok.convert_tokens_to_ids("<video>")) == 1
