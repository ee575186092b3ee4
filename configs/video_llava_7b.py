"""The paper's setting: ISR-DPO on LLaVA-Hound-SFT (Video-LLaVA 7B), 9 iterations.

Paths are where you put the public artifacts (no hub access at run time):
  checkpoints/LLaVA-Hound-SFT    ShareGPTVideo/LLaVA-Hound-SFT (original layout)
  data/video_instruction/...     ShareGPTVideo train QA prompts and test sets
  data/video_frames/             ShareGPTVideo extracted frames (folders per video)
Mesh: fsdp over 8 chips within a host or slice, data parallel across the rest
(a TPU v4-32 / v5p-32 slice: data=2 x fsdp=8); set `--config.mesh.fsdp=...` for
other slices. DPO: the lineage's recipe (defaults.py), bf16 compute over float32
master weights, remat of every decoder layer.

  launch/tpu_vm.sh --name isr-dpo --zone <zone> --accelerator-type v4-32 -- \
    isr-dpo iterate --config=configs/video_llava_7b.py --workdir=gs://<bucket>/isr-dpo
"""
from isr_dpo_jax import defaults


def get_config():
  config = defaults.get_config()
  config.iterations = 9
  config.mesh = dict(data=-1, fsdp=8, tensor=1)
  config.model.checkpoint = "checkpoints/LLaVA-Hound-SFT"
  config.model.dtype = "bfloat16"
  # Prompt and response tokens, the 2,056 video tokens (8 frames x 257) among
  # them: 2048 tokens of text besides.
  config.data.max_length = 2056 + 2048
  config.data.prompts = "data/video_instruction/train/qa/chatgpt_qa_900k.jsonl"
  config.data.video_root = "data/video_frames"
  config.data.prompts_per_iteration = 17_000
  config.data.fresh_prompts = True
  config.sampling.batch_size = 64
  config.self_judge.batch_size = 64
  config.train.batch_size = 128  # pairs per step, as in LLaVA-Hound-DPO
  # 16 packed pairs per micro-batch: one per chip on 16 chips, two on 8.
  config.train.grad_accum_steps = 8
  config.train.remat = "nothing_saveable"
  config.sft.batch_size = 16  # one example per chip on 16 chips
  config.eval.test_root = "data/video_instruction/test"
  config.eval.scoring = "judge"
  config.eval.test_sets = ["msvd", "msrvtt", "tgif", "ssv2"]
  return config
