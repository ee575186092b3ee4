"""The built-in experiment (`make demo`): SFT, then ISR-DPO and two ablations.

Sized for about 13 minutes on 2 CPU cores. See isr_dpo_jax/demo.py.
"""
from isr_dpo_jax import defaults


def get_config():
  config = defaults.get_config()
  config.iterations = 3
  # SFT stage 1 reads one caption per training clip; stage 2 the first 500.
  config.world = defaults.world(num_videos=dict(train=2000, test=32))
  # 16 px patches: 5 video tokens per frame (CLS included), 40 per clip.
  config.world.model.update(hidden_size=128, intermediate_size=256, num_layers=4,
                            vision_hidden_size=64, patch_size=16)
  config.demo = dict(
      align=dict(epochs=4, learning_rate=3e-3),  # SFT stage 1: captions only
      mix_clips=500,  # SFT stage 2 (config.sft) on these clips:
      qa_share=0.15,  # of their QA pairs in the mix
      judge_share=0.8,  # judge examples per QA pair
      judge_context_share=0.6,  # judge examples that show the description
      revision_share=0.25,  # revision examples per clip
  )
  # The tower is random and stays so (see demo.py); the projector and the
  # LLM learn to read it.
  config.sft.update(batch_size=16, epochs=2, learning_rate=2e-3)
  config.sampling.buckets = (64, 128, 256)
  config.sampling.answer.max_new_tokens = 12
  config.sampling.context.max_new_tokens = 96
  config.data.prompts_per_iteration = 192
  config.data.fresh_prompts = False  # the same videos: contexts carry over
  # Step-by-step written verdicts (demo.py says why), parsed for their letter.
  config.self_judge.update(mode="generative", max_new_tokens=16, threshold=0.6)
  config.train.update(batch_size=16, epochs=2, learning_rate=1e-4)
  config.eval.batch_size = 64
  return config
