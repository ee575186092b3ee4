"""Video input cost: decoders per backend, and decoding vs prepared frames.

Runs on the real clips in ../shared/videos (or --videos). First table:
videos per second for read + sample 8 frames + CLIP preprocess, for decord
and PyAV on the mp4 files and for folders of JPEG frames extracted from them
(the layout ShareGPTVideo ships). Second table: what each read of a video
costs the loop (policy.Policy.video: frames, then normalize) when it decodes
the video every time, and when it reads the frames that `isr-dpo
prepare-videos` decoded once (data/video_cache.py, array_record through
TFDS); their ratio; that one-off preparation per video; and the saving per
prompt in one iteration, which reads each prompt's video 6 times with the
default config (answers, judge, reference log-probs, 3 DPO epochs) and each
video once more for its context.

Every row reads the same clips `--repeats` times in one process, rows taking
turns; the decoders may use their own threads. Measured on a 2-core VM shared
with other jobs (so +-30%), 20 repeats:

  backend       read ms  prep ms  videos/s
  decord          101.4     30.4      7.59
  pyav             97.1     34.1      7.62
  jpeg folder      19.4     29.3     20.54

and, later, on the same VM under a heavier load (load average 5), 10 repeats:

  per video read in the loop (Policy.video: 8 frames, 224 px, normalised)
    decoded each time     219.94 ms
    prepared frames        17.62 ms
    ratio                   12.5 x
    saved per read        202.32 ms
    preparation, once     243.18 ms per video (pays off after 1.2 reads)
    per iteration, 6 reads a prompt (defaults): 1.21 s saved per prompt

  python benchmarks/video_io.py [--repeats 10] [--videos DIR]
"""

import argparse
import pathlib
import tempfile
import time

import av
import numpy as np

from isr_dpo_jax.data import video
from isr_dpo_jax.data import video_cache

# Reads of a prompt's video in one iteration with the default config when
# its answers make a pair: answers, judge, reference log-probs, 3 DPO epochs.
READS_PER_PROMPT = 6
DEFAULT_VIDEOS = pathlib.Path(__file__).resolve().parents[1].parent / (
    "shared/videos")


def extract_jpeg_frames(clip: pathlib.Path, folder: pathlib.Path) -> None:
  folder.mkdir()
  with av.open(str(clip)) as container:
    for t, frame in enumerate(container.decode(video=0)):
      frame.to_image().save(folder / f"{t + 1:05d}.jpg", quality=95)


def time_once(paths, backend, num_frames=8, size=224):
  """(seconds reading, seconds preprocessing) for all `paths`."""
  read = prep = 0.0
  for path in paths:
    start = time.perf_counter()
    frames = video.read_video(path, num_frames, backend=backend)
    middle = time.perf_counter()
    video.preprocess(frames, size)
    read += middle - start
    prep += time.perf_counter() - middle
  return read, prep


def time_reads(frames: video_cache.Frames, names) -> float:
  """Seconds for one Policy.video of each of `names`."""
  start = time.perf_counter()
  for name in names:
    video.normalize(frames(name))
  return time.perf_counter() - start


def prepared_vs_decoded(clips, repeats, num_frames=8, size=224):
  """(decoded s, prepared s, preparation s) per video read."""
  root = clips[0].parent
  names = [clip.name for clip in clips]
  with tempfile.TemporaryDirectory() as tmp:
    prompts = pathlib.Path(tmp) / "prompts.jsonl"
    prompts.write_text("".join(
        f'{{"id": "{i}", "video": "{name}", "conversations": '
        '[{"from": "human", "value": "?"}, {"from": "gpt", "value": "."}]}\n'
        for i, name in enumerate(names)))
    start = time.perf_counter()
    video_cache.prepare(pathlib.Path(tmp) / "prepared", [prompts], root,
                        num_frames, size)
    preparation = time.perf_counter() - start
    rows = [video_cache.Frames(root, num_frames, size),
            video_cache.Frames(root, num_frames, size,
                               pathlib.Path(tmp) / "prepared")]
    for frames in rows:  # Warm up: file cache, first reads.
      time_reads(frames, names)
    totals = np.zeros(len(rows))
    for _ in range(repeats):
      for i, frames in enumerate(rows):
        totals[i] += time_reads(frames, names)
  decoded, prepared = totals / (repeats * len(names))
  return decoded, prepared, preparation / len(names)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--videos", type=pathlib.Path, default=DEFAULT_VIDEOS)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  clips = sorted(args.videos.glob("*.mp4"))
  if not clips:
    raise SystemExit(f"no mp4 clips in {args.videos}")

  with tempfile.TemporaryDirectory() as tmp:
    folders = [pathlib.Path(tmp) / clip.stem for clip in clips]
    for clip, folder in zip(clips, folders):
      extract_jpeg_frames(clip, folder)
    rows = [("decord", clips, "decord"), ("pyav", clips, "pyav"),
            ("jpeg folder", folders, "auto")]
    for _, paths, backend in rows:  # Warm up: imports, file cache.
      time_once(paths, backend)
    # Rows take turns, so that a busy machine slows them all alike.
    totals = np.zeros((len(rows), 2))
    for _ in range(args.repeats):
      for i, (_, paths, backend) in enumerate(rows):
        totals[i] += time_once(paths, backend)
    per_video = totals / (args.repeats * len(clips))

  print(f"{len(clips)} clips ({', '.join(c.name for c in clips)}), "
        f"{args.repeats} repeats, 8 frames, 224 px")
  print(f"{'backend':<12} {'read ms':>8} {'prep ms':>8} {'videos/s':>9}")
  for (name, _, _), (read, prep) in zip(rows, per_video):
    print(f"{name:<12} {1e3 * read:>8.1f} {1e3 * prep:>8.1f} "
          f"{1 / (read + prep):>9.2f}")

  decoded, prepared, preparation = prepared_vs_decoded(clips, args.repeats)
  print("\nper video read in the loop (Policy.video: 8 frames, 224 px, "
        "normalised)")
  print(f"  decoded each time   {1e3 * decoded:8.2f} ms")
  print(f"  prepared frames     {1e3 * prepared:8.2f} ms")
  print(f"  ratio               {decoded / prepared:8.1f} x")
  print(f"  saved per read      {1e3 * (decoded - prepared):8.2f} ms")
  print(f"  preparation, once   {1e3 * preparation:8.2f} ms per video "
        f"(pays off after {preparation / (decoded - prepared):.1f} reads)")
  print(f"  per iteration, {READS_PER_PROMPT} reads a prompt (defaults): "
        f"{READS_PER_PROMPT * (decoded - prepared):.2f} s saved per prompt")


if __name__ == "__main__":
  main()
