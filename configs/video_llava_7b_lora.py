"""configs/video_llava_7b.py with LoRA on one chip (a v5p, 95 GB of HBM).

Rank-16 adapters on the LLM's attention and MLP projections train in place
of the model (docs/lora.md): the frozen float32 model (28 GB) is resident,
and only the adapters have gradients and AdamW state. The global batch stays
128 pairs, one packed pair per micro-batch; the sampler runs 8 prompts at a
time.

  isr-dpo plan --config=configs/video_llava_7b_lora.py --topology=v5p:1x1x1
"""
import pathlib

from isr_dpo_jax import cli


def get_config():
  config = cli.load_config(str(pathlib.Path(__file__).with_name("video_llava_7b.py")))
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.train.lora.rank = 16
  config.train.lora.alpha = 32.0
  config.train.grad_accum_steps = config.train.batch_size
  config.sampling.batch_size = 8
  config.self_judge.batch_size = 8
  config.sft.batch_size = 4
  return config
