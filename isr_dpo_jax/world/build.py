"""A config's synthetic world on disk, its tokenizer and its tiny model.

The world's videos and jsonl files (scenes.py), a LLaMA-style tokenizer
trained on the world's text and on every prompt the loop will send
(vocab.py), and a tiny random model of the run's family (`model.family`)
saved in its checkpoint layout, so that every later stage loads it like any
other checkpoint.
"""
import json
import os
import pathlib

from flax import nnx
import ml_collections

from isr_dpo_jax import judge
from isr_dpo_jax import models
from isr_dpo_jax.data import records
from isr_dpo_jax.data import templates
from isr_dpo_jax.world import scenes
from isr_dpo_jax.world import vocab


def write_world(cfg: ml_collections.ConfigDict, root: str | os.PathLike
                ) -> dict[str, pathlib.Path]:
  """Writes the world once; a second call finds it and returns its paths.

  `root/paths.json` holds them relative to `root`, so that a workdir moved
  elsewhere still finds its world (absolute paths, as older runs wrote, are
  read as they are).
  """
  root = pathlib.Path(root)
  index = root / "paths.json"
  if index.exists():
    return {k: root / v for k, v in json.loads(index.read_text()).items()}
  paths = scenes.write_world(root, dict(cfg.num_videos), seed=cfg.seed,
                             num_frames=cfg.num_frames, size=cfg.size)
  index.write_text(json.dumps({k: os.fspath(v.relative_to(root)) for k, v in paths.items()}))
  return paths


def world_text(paths: dict[str, pathlib.Path], prompts: judge.Prompts) -> list[str]:
  """Every sentence the tokenizer should know: records, templates, prompts."""
  lines = [t.system for t in (templates.get("vicuna_v1"), templates.get("v1_custom"))]
  lines += [prompts.first_context, prompts.retrospective_context, prompts.judge,
            prompts.judge_context, "USER: ASSISTANT: A B"]
  for name, path in paths.items():
    if name.endswith("_sft") or name.endswith("_qa"):
      for record in records.load_jsonl(path):
        lines += [turn["value"] for turn in record["conversations"]]
        lines += [record.get("caption", "")]
  return lines


def tiny_model_config(cfg: ml_collections.ConfigDict, vocab_size: int,
                      video_token_id: int, family: str = models.registry.DEFAULT):
  """The world's tiny model: a LLaMA decoder and a CLIP tower, as `family`'s
  config (a Video-LLaVA config or one that extends it)."""
  m = cfg.model
  return models.registry.get(family).config(
      text=models.LlamaConfig(
          vocab_size=vocab_size, hidden_size=m.hidden_size,
          intermediate_size=m.intermediate_size, num_layers=m.num_layers,
          num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
          max_position_embeddings=2048),
      vision=models.VisionConfig(
          hidden_size=m.vision_hidden_size, intermediate_size=4 * m.vision_hidden_size,
          num_layers=m.vision_layers, num_heads=m.vision_heads, image_size=cfg.size,
          patch_size=m.patch_size, num_frames=cfg.num_frames, temporal_attention=False),
      video_token_id=video_token_id)


def init_checkpoint(cfg: ml_collections.ConfigDict, world: dict[str, pathlib.Path],
                    path: str | os.PathLike, prompts: judge.Prompts = judge.Prompts(),
                    family: str = models.registry.DEFAULT) -> pathlib.Path:
  """A randomly initialised tiny model of `family` and its tokenizer at `path`
  (kept if there)."""
  path = pathlib.Path(path)
  if (path / "config.json").exists():
    return path
  tokenizer = vocab.train_tokenizer(world_text(world, prompts), vocab_size=cfg.vocab_size)
  video_token_id = tokenizer.convert_tokens_to_ids("<video>")
  model_cfg = tiny_model_config(cfg, len(tokenizer), video_token_id, family)
  model = models.registry.get(family).model(model_cfg, rngs=nnx.Rngs(cfg.seed))
  models.save_pretrained(model, path, tokenizer=tokenizer)
  return path
