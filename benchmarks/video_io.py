"""Videos per second for read + sample 8 frames + CLIP preprocess, per backend.

Runs on the real clips in ../shared/videos (or --videos): decord and PyAV on
the mp4 files, and folders of JPEG frames extracted from them (the layout
ShareGPTVideo ships). Every row reads the same clips `--repeats` times in one
process; the decoders may use their own threads. Measured on a 2-core VM
shared with other jobs (so +-30%), 20 repeats:

  backend       read ms  prep ms  videos/s
  decord          101.4     30.4      7.59
  pyav             97.1     34.1      7.62
  jpeg folder      19.4     29.3     20.54

  python benchmarks/video_io.py [--repeats 10] [--videos DIR]
"""

import argparse
import pathlib
import tempfile
import time

import av
import numpy as np

from isr_dpo_jax.data import video

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


if __name__ == "__main__":
  main()
