"""Tokenisation of rendered conversations: video expansion, labels, truncation.

How the answer boundaries are found. The whole conversation text is tokenised
in one call, so the ids are exactly those of tokenising the conversation as a
whole (a LLaMA tokenizer does not tokenise "ASSISTANT:" + " The cat" as the
concatenation of the two pieces tokenised alone: SentencePiece glues the
space to the next word as "▁The", and a piece tokenised alone gets its own
leading "▁"). The tokenizer's character offsets then say which tokens come
from answer text: a token is a label when its span starts inside a target
segment of the template (templates.py). The answer's leading space ("▁The")
and its stop text ("</s>", a special token) are therefore labels. A token
whose span crosses a prompt/answer boundary would make the split ambiguous;
it is rejected with a reason (it does not happen with SentencePiece or
byte-level BPE, whose pieces start at a word's leading space).

The video. The tokenizer knows the template's placeholder ("<video>") as one
special token; after tokenising, that one id is replaced by
`num_video_tokens` copies of the model's `video_token_id`, so sequence
lengths are static and the model merges its visual embeddings at those
positions. This equals Hugging Face's Video-LLaVA processor, which repeats
the placeholder in the text before tokenising.

Truncation policy. The prompt (system text, video tokens, question) is never
cut: a prompt longer than `max_length - min_response_tokens` is rejected. A
response that does not fit in the rest of `max_length` loses its end (its
"</s>" first), as long as `min_response_tokens` label tokens remain;
otherwise the example is rejected. Rejections raise records.BadRecord, so
bulk callers skip, log and count them like any other bad record.
"""
from collections.abc import Sequence
import dataclasses

import numpy as np
import transformers

from isr_dpo_jax.data import records
from isr_dpo_jax.data import templates


@dataclasses.dataclass(frozen=True)
class PreferenceTokens:
  """A DPO example: the shared prompt and two responses (eos included)."""
  prompt: np.ndarray  # int32 [Lp]
  chosen: np.ndarray  # int32 [Lc]
  rejected: np.ndarray  # int32 [Lr]


@dataclasses.dataclass(frozen=True)
class SftTokens:
  """An SFT example: the prompt up to the first answer, then the rest.

  `target` holds everything after the prompt; `loss` marks its answer tokens
  (in a multi-turn conversation, later questions sit in `target` unmarked).
  """
  prompt: np.ndarray  # int32 [Lp]
  target: np.ndarray  # int32 [Lt]
  loss: np.ndarray  # bool [Lt]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """Turns conversations into token ids for one model and template.

  Attributes:
    tokenizer: a fast Hugging Face tokenizer (character offsets are needed)
      that knows `template.video_token` as a special token (see
      `add_video_token`).
    template: the conversation template.
    video_token_id: the model's id for video positions (`model.video`,
      models/interface.py).
    num_video_tokens: visual embeddings per video (e.g. 8 x 256), the model's
      `video.num_tokens`.
    max_length: the most tokens of prompt plus response.
    min_response_tokens: the fewest answer tokens a truncated response keeps.
  """
  tokenizer: transformers.PreTrainedTokenizerBase
  template: templates.Template
  video_token_id: int
  num_video_tokens: int
  max_length: int = 2048
  min_response_tokens: int = 8

  def __post_init__(self):
    if not self.tokenizer.is_fast:
      raise ValueError("a fast tokenizer is needed (character offsets)")
    token = self.template.video_token
    if token not in self.tokenizer.get_vocab():
      raise ValueError(f"the tokenizer has no {token!r} token; "
                       "call tokenize.add_video_token(tokenizer) first")

  @property
  def _placeholder_id(self) -> int:
    return self.tokenizer.convert_tokens_to_ids(self.template.video_token)

  def encode(self, turns: Sequence[tuple[str, str | None]],
             with_video: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ids int32 [L] and labels bool [L] of a conversation, untruncated."""
    segments = self._render(turns, with_video)
    text = "".join(s.text for s in segments)
    enc = self.tokenizer(text, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts, ends = np.asarray(enc["offset_mapping"]).reshape(-1, 2).T
    # Character offsets where the text switches between prompt and answer.
    is_target = np.asarray([s.is_target for s in segments])
    seg_starts = np.cumsum([0] + [len(s.text) for s in segments[:-1]])
    switches = seg_starts[1:][is_target[1:] != is_target[:-1]]
    crossing = (starts[:, None] < switches) & (ends[:, None] > switches)
    if crossing.any():
      raise records.BadRecord(
          "token_crosses_answer_boundary",
          f"a token spans a prompt/answer boundary in {text!r}")
    labels = is_target[np.searchsorted(seg_starts, starts, side="right") - 1]
    return self._expand_video(ids, labels, with_video)

  def prompt(self, question: str, with_video: bool = True) -> np.ndarray:
    """The ids int32 [Lp] of a one-question prompt for generation."""
    ids, _ = self.encode([(question, None)], with_video)
    self._check_prompt(ids)
    return ids

  def preference(self, question: str, chosen: str, rejected: str,
                 with_video: bool = True) -> PreferenceTokens:
    """A DPO example; both responses are cut to the same length budget."""
    prompt, chosen_ids, _ = self._split(
        self.encode([(question, chosen)], with_video))
    _, rejected_ids, _ = self._split(
        self.encode([(question, rejected)], with_video))
    return PreferenceTokens(prompt, chosen_ids, rejected_ids)

  def sft(self, turns: Sequence[tuple[str, str]],
          with_video: bool = True) -> SftTokens:
    """An SFT example from complete (question, answer) turns."""
    return SftTokens(*self._split(self.encode(turns, with_video)))

  def _render(self, turns, with_video) -> list[templates.Segment]:
    try:
      return self.template.render(turns, with_video)
    except ValueError as e:
      raise records.BadRecord("bad_conversation", str(e)) from None

  def _expand_video(self, ids, labels, with_video):
    where = np.flatnonzero(ids == self._placeholder_id)
    if len(where) != int(with_video):
      raise records.BadRecord(
          "bad_video_placeholder",
          f"{len(where)} video placeholders, expected {int(with_video)}")
    if not with_video:
      return ids, labels
    (i,) = where
    video = np.full(self.num_video_tokens, self.video_token_id, np.int32)
    ids = np.concatenate([ids[:i], video, ids[i + 1:]])
    labels = np.concatenate(
        [labels[:i], np.zeros(self.num_video_tokens, bool), labels[i + 1:]])
    return ids, labels

  def _check_prompt(self, prompt: np.ndarray):
    limit = self.max_length - self.min_response_tokens
    if len(prompt) > limit:
      raise records.BadRecord(
          "prompt_too_long", f"{len(prompt)} prompt tokens > {limit}")

  def _split(self, encoded):
    """(prompt, response, response labels), the response cut to fit."""
    ids, labels = encoded
    first = np.flatnonzero(labels)
    if not len(first):
      raise records.BadRecord("no_answer", "the conversation has no answer")
    prompt, response, loss = ids[:first[0]], ids[first[0]:], labels[first[0]:]
    self._check_prompt(prompt)
    budget = self.max_length - len(prompt)
    if len(response) > budget:
      kept = int(loss[:budget].sum())
      if kept < self.min_response_tokens:
        raise records.BadRecord(
            "response_too_long",
            f"{kept} answer tokens fit after a {len(prompt)}-token prompt, "
            f"fewer than {self.min_response_tokens}")
      response, loss = response[:budget], loss[:budget]
    return prompt, response, loss


def add_video_token(tokenizer: transformers.PreTrainedTokenizerBase,
                    token: str = "<video>") -> int:
  """Makes `token` one special token of `tokenizer` (in place); its id.

  The original LLaVA-Hound tokenizer has no video token (it splices an id
  into the ids); adding one lets the whole conversation be tokenised once.
  """
  if token not in tokenizer.get_vocab():
    tokenizer.add_tokens(token, special_tokens=True)
  return tokenizer.convert_tokens_to_ids(token)
