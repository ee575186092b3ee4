"""A synthetic video world: shapes that move, appear, disappear, change colour.

The built-in demo teaches a tiny Video-LLaVA this world by SFT and then
improves it by ISR-DPO; fast end-to-end tests run on it. A clip is `T` frames
of `size` px: one to three shapes on a white background, each with its own
shape and colour, and each doing one thing at its own frame, so that events
have an order. Every answer needs the video: colours, shapes, counts,
directions, events and mention orders are drawn uniformly and independently
of the question's words.

A clip is a pure function of (seed, clip id). Its ground truth holds every
object's per-frame position, visibility and colour; the frames, the caption,
the detailed description and the question/answer pairs are all derived from
it. Answers are one canonical word that `answer_is_correct` finds in a
free-text response.
"""

from collections.abc import Iterator, Mapping
import dataclasses
import os
import pathlib
import re
import zlib

import av
import numpy as np
from PIL import Image

from isr_dpo_jax import judge
from isr_dpo_jax.data import records

COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
BACKGROUND = (245, 245, 245)  # "white" in the texts.
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = ("move", "appear", "disappear", "change")
NUMBERS = ("one", "two", "three")
MAX_OBJECTS = len(NUMBERS)

CAPTION_PROMPT = "Describe the video in one sentence."
DESCRIBE_PROMPT = judge.FIRST_CONTEXT  # SFT teaches the loop's first context

# Words that share a category exclude each other in a correct response.
_CATEGORIES = (tuple(COLORS), SHAPES, tuple(DIRECTIONS), NUMBERS,
               ("appears", "disappears"))
_FORMS = {
    "one": ("one", "1"), "two": ("two", "2"), "three": ("three", "3"),
    "appears": ("appears", "appear", "appeared"),
    "disappears": ("disappears", "disappear", "disappeared", "vanishes"),
}
_REGIONS = (("top left", "top", "top right"),
            ("left", "middle", "right"),
            ("bottom left", "bottom", "bottom right"))


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip: frames uint8 [T, size, size, 3] and everything known about it."""
  id: str
  frames: np.ndarray
  truth: dict  # JSON-ready: size, num_frames, objects sorted by onset
  caption: str
  description: str
  qa: list[dict]  # {"kind", "question", "answer", "response"}


def make_clip(clip_id: str, seed: int = 0, num_frames: int = 8,
              size: int = 32) -> Clip:
  """The clip named `clip_id` in the world of `seed`."""
  rng = np.random.default_rng([seed, zlib.crc32(clip_id.encode())])
  truth = sample_truth(rng, num_frames, size)
  return Clip(clip_id, render(truth), truth, caption(truth), describe(truth),
              questions(truth, rng))


def generate(split: str, count: int, seed: int = 0, **clip_kwargs
             ) -> Iterator[Clip]:
  """Clips `{split}_00000`, ...: splits never share a video."""
  for index in range(count):
    yield make_clip(f"{split}_{index:05d}", seed, **clip_kwargs)


# Ground truth and rendering.


def sample_truth(rng: np.random.Generator, num_frames: int, size: int) -> dict:
  """Objects with distinct shapes, colours and onsets that never overlap."""
  if num_frames - 2 < MAX_OBJECTS or size < 16:
    raise ValueError(f"need num_frames >= {MAX_OBJECTS + 2} and size >= 16, "
                     f"got {num_frames} and {size}")
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  shapes = rng.permutation(SHAPES)[:count]
  colors = rng.permutation(list(COLORS))
  # Onsets leave a mover at least two frames of motion.
  onsets = np.sort(rng.choice(np.arange(1, num_frames - 1), count, False))
  objects = []
  for shape, color, onset in zip(shapes, colors, onsets):
    event = str(rng.choice(EVENTS))
    objects.append({
        "shape": str(shape), "color": str(color), "event": event,
        "onset": int(onset),
        "direction": (str(rng.choice(list(DIRECTIONS))) if event == "move"
                      else None),
        "new_color": str(colors[-1]) if event == "change" else None,
    })
  radius = _radius(size)
  for _ in range(1000):
    placed = [{**obj, **_track(obj, rng, num_frames, size, radius)}
              for obj in objects]
    if _apart(placed, radius):
      return {"size": size, "num_frames": num_frames, "objects": placed}
  raise RuntimeError(f"cannot place {count} shapes apart in {size} px")


def _radius(size: int) -> int:
  return size // 8


def _step(size: int, num_frames: int) -> int:
  return max(1, size // (2 * num_frames))


def _track(obj, rng, num_frames, size, radius) -> dict:
  """Per-frame positions (x, y), visibility and colour of one object."""
  t = np.arange(num_frames)
  dx, dy = DIRECTIONS.get(obj["direction"], (0, 0))
  travel = _step(size, num_frames) * np.maximum(t - obj["onset"] + 1, 0)
  lo, hi = radius, size - 1 - radius
  x0, y0 = (int(rng.integers(lo + max(0, -d) * travel[-1],
                             hi - max(0, d) * travel[-1] + 1))
            for d in (dx, dy))
  after = t >= obj["onset"]
  visible = {"appear": after, "disappear": ~after}.get(
      obj["event"], np.ones_like(after))
  return {"x": (x0 + dx * travel).tolist(), "y": (y0 + dy * travel).tolist(),
          "visible": visible.tolist(),
          "colors": [obj["new_color"] if obj["event"] == "change" and a
                     else obj["color"] for a in after]}


def _apart(objects, radius) -> bool:
  """Whether visible shapes keep at least two background pixels between them."""
  for i, a in enumerate(objects):
    for b in objects[:i]:
      for t, (va, vb) in enumerate(zip(a["visible"], b["visible"])):
        gap = max(abs(a["x"][t] - b["x"][t]), abs(a["y"][t] - b["y"][t]))
        if va and vb and gap <= 2 * radius + 2:
          return False
  return True


def shape_mask(shape: str, x: int, y: int, radius: int,
               size: int) -> np.ndarray:
  """bool [size, size]: a shape centred at (x, y), `radius` px to its edges."""
  yy, xx = np.mgrid[:size, :size]
  dx, dy = xx - x, yy - y
  inside = (abs(dx) <= radius) & (abs(dy) <= radius)
  if shape == "circle":
    return dx**2 + dy**2 <= radius * (radius + 1)
  if shape == "triangle":  # Apex up, base `2 * radius + 1` px wide.
    return inside & (2 * abs(dx) <= dy + radius)
  return inside


def render(truth: Mapping) -> np.ndarray:
  """uint8 [T, size, size, 3] frames of a ground truth."""
  size, radius = truth["size"], _radius(truth["size"])
  frames = np.empty((truth["num_frames"], size, size, 3), np.uint8)
  frames[:] = BACKGROUND
  for obj in truth["objects"]:
    for t, frame in enumerate(frames):
      if obj["visible"][t]:
        mask = shape_mask(obj["shape"], obj["x"][t], obj["y"][t], radius, size)
        frame[mask] = COLORS[obj["colors"][t]]
  return frames


# Text.


def _name(obj) -> str:
  return f"{obj['color']} {obj['shape']}"


def _event_phrase(obj) -> str:
  return {"move": f"moves {obj['direction']}", "appear": "appears",
          "disappear": "disappears",
          "change": f"turns {obj['new_color']}"}[obj["event"]]


def _event_answer(obj) -> str:
  return {"move": obj["direction"], "appear": "appears",
          "disappear": "disappears", "change": obj["new_color"]}[obj["event"]]


def _region(obj, t: int, size: int) -> str:
  row, col = (min(3 * v // size, 2) for v in (obj["y"][t], obj["x"][t]))
  region = _REGIONS[row][col]
  return {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
          "right": "on the right"}.get(region, f"in the {region}")


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else (
      ", ".join(items[:-1]) + " and " + items[-1])


def _shapes(n: int) -> str:
  return f"{NUMBERS[n - 1]} shape{'s' if n > 1 else ''}"


def caption(truth: Mapping) -> str:
  """One sentence: the events in order."""
  clauses = [f"a {_name(o)} {_event_phrase(o)}" for o in truth["objects"]]
  text = clauses[0] + "".join(
      f", {'and then' if i == len(clauses) - 1 else 'then'} {c}"
      for i, c in enumerate(clauses[1:], 1))
  return text[0].upper() + text[1:] + "."


def describe(truth: Mapping) -> str:
  """A detailed description: shapes, where they start, what happens, the end."""
  objects, size = truth["objects"], truth["size"]
  last = truth["num_frames"] - 1
  sentences = [f"The video shows {_shapes(len(objects))} on a white background"
               f": {_join([f'a {_name(o)}' for o in objects])}."]
  start = [f"the {_name(o)} is {_region(o, 0, size)}"
           for o in objects if o["visible"][0]]
  hidden = [f"the {_name(o)}" for o in objects if not o["visible"][0]]
  if start:
    sentences.append(f"At the start, {_join(start)}.")
  if hidden:
    sentences.append(f"At first, {_join(hidden)} "
                     f"{'is' if len(hidden) == 1 else 'are'} not visible.")
  ordinals = (["First", "Next", "Finally"] if len(objects) == 3
              else ["First", "Then"])
  for ordinal, obj in zip(ordinals, objects):
    where = (f" {_region(obj, obj['onset'], size)}"
             if obj["event"] == "appear" else "")
    sentences.append(
        f"{ordinal}, the {_name(obj)} {_event_phrase(obj)}{where}.")
  visible = [f"a {o['colors'][last]} {o['shape']}"
             for o in objects if o["visible"][last]]
  sentences.append(
      f"At the end, {_join(visible)} {'is' if len(visible) == 1 else 'are'} "
      "visible." if visible else "At the end, no shape is visible.")
  return " ".join(sentences)


def questions(truth: Mapping, rng: np.random.Generator) -> list[dict]:
  """Question/answer pairs: colour, shape, count, direction, event, order."""
  objects = truth["objects"]
  qa = []

  def ask(kind, question, answer, response):
    qa.append({"kind": kind, "question": question, "answer": answer,
               "response": response})

  n = len(objects)
  ask("count", "How many shapes are there in the video?", NUMBERS[n - 1],
      f"There {'is' if n == 1 else 'are'} {_shapes(n)}.")
  for obj in objects:
    if obj["event"] != "change":
      ask("color", f"What color is the {obj['shape']}?", obj["color"],
          f"The {obj['shape']} is {obj['color']}.")
      ask("shape", f"What shape is the {obj['color']} object?", obj["shape"],
          f"It is a {obj['shape']}.")
    if obj["event"] == "move":
      ask("direction", f"Which way does the {_name(obj)} move?",
          obj["direction"], f"It moves {obj['direction']}.")
    ask("event", f"What happens to the {_name(obj)}?", _event_answer(obj),
        f"It {_event_phrase(obj)}.")
  for i, first in enumerate(objects):
    for later in objects[i + 1:]:
      a, b = (first, later) if rng.random() < 0.5 else (later, first)
      ask("order", f"Which happens first: the {_name(a)} {_event_phrase(a)}, "
          f"or the {_name(b)} {_event_phrase(b)}?", first["shape"],
          f"The {_name(first)} {_event_phrase(first)} first.")
  return qa


def mentions(text: str, word: str) -> bool:
  """Whether lower-case `text` has `word` in one of its forms ("2", "appeared")."""
  return any(re.search(rf"\b{re.escape(form)}\b", text)
             for form in _FORMS.get(word, (word,)))


def alternatives(answer: str) -> tuple[str, ...]:
  """The other words of a canonical answer's category: its wrong answers."""
  category = next((c for c in _CATEGORIES if answer in c), ())
  return tuple(word for word in category if word != answer)


def answer_is_correct(response: str, answer: str) -> bool:
  """Whether a free-text response gives a canonical answer of this world.

  Correct when the response mentions the answer ("two" or "2", "appears" or
  "appeared") and no other word of its category: "The square is red." answers
  "red"; "red or blue" does not. Answers outside the world's vocabulary need
  all their words in the response.
  """
  text, answer = response.lower(), answer.lower().strip(" .")
  category = next((c for c in _CATEGORIES if answer in c), None)
  if category is None:
    return all(mentions(text, word) for word in answer.split())
  return [word for word in category if mentions(text, word)] == [answer]


# Records and files.


def turns(question: str, response: str) -> list[dict]:
  """A one-turn ShareGPT conversation about the video."""
  return [{"from": "human", "value": f"<video>\n{question}"},
          {"from": "gpt", "value": response}]


def sft_records(clip: Clip, video: str) -> list[dict]:
  """Instruction records: every QA pair, the caption and the description."""
  pairs = [(q["question"], q["response"]) for q in clip.qa]
  pairs += [(CAPTION_PROMPT, clip.caption), (DESCRIBE_PROMPT, clip.description)]
  return [{"id": f"{clip.id}_{i}", "video": video,
           "conversations": turns(question, response)}
          for i, (question, response) in enumerate(pairs)]


def eval_records(clip: Clip, video: str) -> list[dict]:
  """Test QA records; the answer is the canonical word, `kind` says its type."""
  return [{"id": f"{clip.id}_{i}", "video": video, "caption": clip.caption,
           "kind": q["kind"],
           "conversations": turns(q["question"], q["answer"])}
          for i, q in enumerate(clip.qa)]


def write_frames(frames: np.ndarray, folder: pathlib.Path) -> None:
  """Lossless PNG frames 00000.png, ... in `folder`, as in ShareGPTVideo."""
  folder.mkdir(parents=True, exist_ok=True)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(folder / f"{t:05d}.png")


def write_mp4(frames: np.ndarray, path: pathlib.Path, fps: int = 8) -> None:
  """H.264 at near-lossless quality (crf 10, yuv420p: half-res chroma)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps, options={"crf": "10"})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
    container.mux(stream.encode())


def write_world(root: str | os.PathLike, num_videos: Mapping[str, int],
                seed: int = 0, num_frames: int = 8, size: int = 32,
                video_format: str = "frames") -> dict[str, pathlib.Path]:
  """Writes videos and jsonl files for each split; returns their paths.

  Args:
    root: output folder.
    num_videos: videos per split, e.g. {"train": 512, "test": 64}.
    seed: the world; a clip depends only on it and its id.
    num_frames: T.
    size: frame side in px.
    video_format: "frames" (PNG folders) or "mp4".

  Returns:
    "video_root" (the folder the records' "video" fields are relative to),
    "ground_truth" (one line per video: id, split, truth, texts, QA), and per
    split "{split}_sft" (instruction records: QA, caption, description) and
    "{split}_qa" (test QA records with captions).
  """
  if video_format not in ("frames", "mp4"):
    raise ValueError(f"video_format must be 'frames' or 'mp4': {video_format}")
  root = pathlib.Path(root)
  video_root = root / "videos"
  paths = {"video_root": video_root,
           "ground_truth": root / "ground_truth.jsonl"}
  truths = []
  for split, count in num_videos.items():
    sft, test = [], []
    for clip in generate(split, count, seed, num_frames=num_frames, size=size):
      if video_format == "mp4":
        video = f"{clip.id}.mp4"
        write_mp4(clip.frames, video_root / video)
      else:
        video = clip.id
        write_frames(clip.frames, video_root / video)
      sft += sft_records(clip, video)
      test += eval_records(clip, video)
      truths.append({"id": clip.id, "video": video, "split": split,
                     "caption": clip.caption, "description": clip.description,
                     "qa": clip.qa, "truth": clip.truth})
    paths[f"{split}_sft"] = root / f"{split}_sft.jsonl"
    paths[f"{split}_qa"] = root / f"{split}_qa.jsonl"
    records.write_jsonl(paths[f"{split}_sft"], sft)
    records.write_jsonl(paths[f"{split}_qa"], test)
  records.write_jsonl(paths["ground_truth"], truths)
  return paths
