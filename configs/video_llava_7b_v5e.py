"""configs/video_llava_7b.py on a v5e slice of 16 chips (v5litepod-16).

A v5e chip has 16 GB of HBM: the weights and AdamW state are split over all
16 chips (fsdp 16), and the sampler runs 16 prompts at a time, one a chip
(each prompt's KV cache, 4,104 + 512 tokens, is 2.3 GB). At 32 the prefills
plan at 87% of HBM but the judge's scoring pass does not fit (15.82 of
15.75 GB); at 16 it plans at 67% (docs/scale.md, "The sampler fits a v5e").
DPO keeps the global batch of 128 pairs: 8 micro-batches of 16, one pair per
chip, and keeps each decoder layer's input in the host's memory until the
backward pass needs it (32 layers x 40 MiB a chip; without it the update
plans at 94% of HBM).

  isr-dpo plan --config=configs/video_llava_7b_v5e.py --topology=v5e:4x4
"""
import pathlib

from isr_dpo_jax import cli


def get_config():
  config = cli.load_config(str(pathlib.Path(__file__).with_name("video_llava_7b.py")))
  config.mesh = dict(data=-1, fsdp=16, tensor=1)
  config.sampling.batch_size = 16
  config.self_judge.batch_size = 16
  config.train.remat = "offload_layer_inputs"
  return config
