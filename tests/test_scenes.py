"""The synthetic world: answers recomputed from pixels, files read back."""

import collections
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from isr_dpo_jax.data import records
from isr_dpo_jax.world import scenes
from isr_dpo_jax.data import video

NUM_VIDEOS = {"train": 6, "test": 3}


@pytest.fixture(scope="module")
def clips():
  return list(scenes.generate("check", 40, seed=3))


@pytest.fixture(scope="module", params=["frames", "mp4"])
def world(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  return request.param, scenes.write_world(
      root, NUM_VIDEOS, seed=7, video_format=request.param)


# An independent reading of the frames: shapes are told apart by how much of
# their bounding box they fill (square 1, circle ~0.75, triangle ~0.5).


def blobs(frame):
  """{shape: (color, x, y)} of one lossless frame."""
  found = {}
  for color, rgb in scenes.COLORS.items():
    labels, count = ndimage.label(np.all(frame == rgb, axis=-1))
    for index in range(1, count + 1):
      ys, xs = np.nonzero(labels == index)
      fill = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
      shape = ("square" if fill > 0.9 else "circle" if fill > 0.62
               else "triangle")
      assert shape not in found, "shapes are unique within a clip"
      found[shape] = (color, xs.mean(), ys.mean())
  return found


def tracks(frames):
  """{shape: [per-frame (color, x, y) or None]}."""
  per_frame = [blobs(frame) for frame in frames]
  shapes = set().union(*per_frame)
  return {s: [found.get(s) for found in per_frame] for s in shapes}


def direction(track):
  seen = [state for state in track if state]
  dx, dy = (seen[-1][i] - seen[0][i] for i in (1, 2))
  if abs(dx) > abs(dy):
    return "right" if dx > 0 else "left"
  return "down" if dy > 0 else "up"


def event(track):
  if not track[0]:
    return "appears"
  if not track[-1]:
    return "disappears"
  if track[0][0] != track[-1][0]:
    return track[-1][0]
  return direction(track)


def onset(track):
  return next(t for t in range(1, len(track)) if track[t] != track[t - 1])


def answer_from_pixels(question, shapes):
  """The answer to a question, from the question's words and the pixels."""
  named = [w for w in re.findall(r"\w+", question) if w in shapes]
  if question.startswith("How many"):
    return scenes.NUMBERS[len(shapes) - 1]
  if question.startswith("What color"):
    colors = {state[0] for state in shapes[named[0]] if state}
    assert len(colors) == 1
    return colors.pop()
  if question.startswith("What shape"):
    color = question.split()[-2]
    return next(s for s, track in shapes.items()
                if any(state and state[0] == color for state in track))
  if question.startswith("Which way"):
    return direction(shapes[named[0]])
  if question.startswith("What happens"):
    return event(shapes[named[0]])
  if question.startswith("Which happens first"):
    return min(named, key=lambda s: onset(shapes[s]))
  raise ValueError(question)


def test_answers_agree_with_the_pixels(clips):
  kinds = collections.Counter()
  for clip in clips:
    shapes = tracks(clip.frames)
    for qa in clip.qa:
      assert qa["answer"] == answer_from_pixels(qa["question"], shapes), (
          clip.id, qa)
      kinds[qa["kind"]] += 1
    # The caption tells the events in the order they happen.
    order = sorted(shapes, key=lambda s: onset(shapes[s]))
    mentions = [m for m in re.findall(r"\w+", clip.caption) if m in shapes]
    assert mentions == order, clip.caption
  assert set(kinds) == {"count", "color", "shape", "direction", "event",
                        "order"}


def test_same_seed_same_world(clips):
  again = scenes.make_clip(clips[5].id, seed=3)
  np.testing.assert_array_equal(again.frames, clips[5].frames)
  assert (again.truth, again.qa, again.caption, again.description) == (
      clips[5].truth, clips[5].qa, clips[5].caption, clips[5].description)
  other = scenes.make_clip(clips[5].id, seed=4)
  assert other.truth != clips[5].truth


def test_written_world_is_deterministic(tmp_path):
  texts = []
  for name in ("a", "b"):
    paths = scenes.write_world(tmp_path / name, {"train": 3}, seed=1)
    texts.append([paths[k].read_text() for k in ("train_sft", "ground_truth")])
  assert texts[0] == texts[1]


def test_answers_need_the_video():
  """No answer is predictable from the question's words alone."""
  by_question = collections.defaultdict(collections.Counter)
  first_mentioned = []
  for clip in scenes.generate("prior", 400, seed=0):
    for qa in clip.qa:
      by_question[qa["question"]][qa["answer"]] += 1
      if qa["kind"] == "order":
        first_mentioned.append(
            qa["question"].index(qa["answer"]) < len(qa["question"]) // 2)
  common = [answers for answers in by_question.values()
            if sum(answers.values()) >= 50]
  assert common  # count, colour and shape questions
  for answers in common:
    assert max(answers.values()) / sum(answers.values()) < 0.45, answers
  assert 0.4 < np.mean(first_mentioned) < 0.6


@pytest.mark.parametrize("response, answer, correct", [
    ("The square is red.", "red", True),
    ("Red.", "red", True),
    ("It is red or blue.", "red", False),
    ("There are 2 shapes.", "two", True),
    ("There are two shapes, one of them red.", "two", False),
    ("It appeared in the middle.", "appears", True),
    ("It disappears.", "appears", False),
    ("It moves to the left.", "left", True),
    ("The circle moves first, then the square.", "square", False),
    ("The yellow triangle turns blue.", "blue", False),  # two colours named
    ("a small dog", "Dog.", True),  # outside the world: every word
])
def test_answer_is_correct(response, answer, correct):
  assert scenes.answer_is_correct(response, answer) == correct


def test_responses_are_correct_for_their_answer_only(clips):
  for qa in (qa for clip in clips for qa in clip.qa):
    assert scenes.answer_is_correct(qa["response"], qa["answer"]), qa
    category = next(c for c in (scenes.COLORS, scenes.SHAPES,
                                scenes.DIRECTIONS, scenes.NUMBERS,
                                ("appears", "disappears"))
                    if qa["answer"] in c)
    for other in set(category) - {qa["answer"]}:
      assert not scenes.answer_is_correct(qa["response"], other), qa


def test_world_files(world):
  video_format, paths = world
  by_split = {}
  for split in NUM_VIDEOS:
    # No bad record: each is well formed and its video exists.
    sft, test = (records.read_jsonl(paths[f"{split}_{suffix}"], kind,
                                    paths["video_root"], max_error_rate=0.0)
                 for suffix, kind in (("sft", "qa"), ("qa", "test_qa")))
    by_split[split] = {r["video"] for r in sft.records + test.records}
    assert len(by_split[split]) == NUM_VIDEOS[split]
    assert {r["conversations"][0]["value"] for r in sft.records} >= {
        f"<video>\n{scenes.DESCRIBE_PROMPT}",
        f"<video>\n{scenes.CAPTION_PROMPT}"}
  assert not by_split["train"] & by_split["test"]
  truths = [json.loads(line) for line in open(paths["ground_truth"])]
  assert len(truths) == sum(NUM_VIDEOS.values())

  for truth in truths[:3]:
    expected = scenes.render(truth["truth"])
    for backend in ("decord", "pyav"):
      frames = video.read_video(paths["video_root"] / truth["video"], 8,
                                backend=backend)
      if video_format == "frames":
        np.testing.assert_array_equal(frames, expected)
        continue
      # H.264 with half-resolution chroma blurs colour edges only: shape
      # centres keep their colour.
      assert np.abs(frames.astype(int) - expected).mean() < 6
      for obj in truth["truth"]["objects"]:
        for t, (x, y) in enumerate(zip(obj["x"], obj["y"])):
          rgb = scenes.COLORS[obj["colors"][t]] if obj["visible"][t] else (
              scenes.BACKGROUND)
          assert np.abs(frames[t, y, x].astype(int) - rgb).max() < 40


def test_rejects_worlds_too_small():
  with pytest.raises(ValueError, match="num_frames"):
    scenes.make_clip("x", num_frames=4)
