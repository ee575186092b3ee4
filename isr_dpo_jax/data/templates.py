"""Conversation templates: how (question, answer) turns become one text.

A template renders a conversation into segments, each marked as prompt or
target, so that tokenisation can find the answer tokens without re-tokenising
pieces (see tokenize.py). The layout is the "TWO" separator style of the
LLaVA / Video-LLaVA lineage:

  {system}{sep}USER: <video>\\n{q1}{sep}ASSISTANT: {a1}{sep2}USER: {q2}{sep}...

The target of each turn is " {answer}{sep2}": the space after "ASSISTANT:"
and the stop text belong to the answer, so a prompt for generation ends with
"ASSISTANT:" and the model learns to write " {answer}</s>".

Templates live in a registry; configs add their own, either by name
(`get("vicuna_v1")`) or as a mapping of Template fields (`resolve({...})`).
"""
from collections.abc import Mapping, Sequence
import dataclasses

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's "
    "questions.")


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of rendered text; `is_target` marks answer text (the labels)."""
  text: str
  is_target: bool


@dataclasses.dataclass(frozen=True)
class Template:
  """A chat layout: system text, role names and separators.

  Attributes:
    name: registry key.
    system: system text, written once before the first turn.
    roles: (user, assistant) role names.
    sep: written after the system text and after every question.
    sep2: written after every answer; it is the stop text (Vicuna's `</s>`).
    video_token: the placeholder for the video in the first question.
  """
  name: str
  system: str
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "
  sep2: str = "</s>"
  video_token: str = "<video>"

  def render(self, turns: Sequence[tuple[str, str | None]],
             with_video: bool = True) -> list[Segment]:
    """Renders (question, answer) turns; a final answer of None is a prompt.

    The video placeholder is taken out of the first question wherever it is
    and put in front of it, followed by a newline, as the lineage does.
    """
    user, assistant = self.roles
    segments = [Segment(self.system + self.sep, False)]
    for i, (question, answer) in enumerate(turns):
      if i == 0 and with_video:
        question = question.replace(self.video_token, "").strip()
        question = f"{self.video_token}\n{question}"
      elif self.video_token in question:
        raise ValueError(f"{self.video_token!r} outside the first question")
      segments.append(
          Segment(f"{user}: {question}{self.sep}{assistant}:", False))
      if answer is None:
        if i != len(turns) - 1:
          raise ValueError("only the last turn may have no answer")
        break
      if self.video_token in answer:
        raise ValueError(f"{self.video_token!r} inside an answer")
      segments.append(Segment(f" {answer}{self.sep2}", True))
    return segments

  def prompt(self, question: str, with_video: bool = True) -> str:
    """The text of a one-question prompt, ready for generation."""
    return "".join(s.text for s in self.render([(question, None)], with_video))


_REGISTRY: dict[str, Template] = {}


def register(template: Template) -> Template:
  """Adds a template to the registry (replacing one of the same name)."""
  _REGISTRY[template.name] = template
  return template


def get(name: str) -> Template:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(
        f"unknown template {name!r}; known: {sorted(_REGISTRY)}") from None


def resolve(spec: str | Mapping) -> Template:
  """A template from a config value: a registered name or a field mapping."""
  if isinstance(spec, str):
    return get(spec)
  fields = dict(spec)
  if "roles" in fields:
    fields["roles"] = tuple(fields["roles"])
  return register(Template(**fields))


register(Template(name="vicuna_v1", system=VICUNA_SYSTEM))
# ISR-DPO's variant for short answers, `conv_vicuna_v1_custom` of its
# llava/conversation.py (github.com/snumprlab/isr-dpo): the same layout, a
# system text without "detailed" and with one more sentence.
register(Template(
    name="v1_custom",
    system=("A chat between a curious user and an artificial intelligence "
            "assistant. The assistant gives helpful, and polite answers to the "
            "user's questions. Answer the response within two sentences.")))
