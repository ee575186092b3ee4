"""The built-in experiment (`make demo`): ISR-DPO, two ablations and a
positive control, each for three iterations from the shipped SFT model.

`isr-dpo demo --stage=sft` trains that model (pi_0) with this config's world,
`demo` and `sft` fields. See isr_dpo_jax/demo.py.
"""
import pathlib

import isr_dpo_jax
from isr_dpo_jax import defaults
from isr_dpo_jax import settings

# The shipped pi_0: `isr-dpo demo --stage=sft` wrote it (docs/demo.md).
PI0 = pathlib.Path(isr_dpo_jax.__file__).parent / "world" / "pi0"


def get_config():
  config = defaults.get_config()
  config.iterations = 3
  # 2000 training clips (SFT stage 1 reads a caption of each); 320 held out,
  # 2,462 questions: a paired 95% interval of about +-2.2 points.
  config.world = defaults.world(num_videos=dict(train=2000, test=320))
  # 8 px patches: 17 video tokens per frame (CLS included), 136 per clip; at
  # 16 px the model cannot tell which shape has which colour.
  config.world.model.update(hidden_size=128, intermediate_size=256, num_layers=4,
                            vision_hidden_size=64, patch_size=8)
  config.demo = dict(
      pi0=str(PI0),
      loop_clips=192,  # the loop asks every question about these clips
      align=dict(epochs=4, learning_rate=3e-3),  # SFT stage 1: captions only
      mix_clips=1000,  # SFT stage 2 (config.sft) on these clips:
      qa_share=0.15,  # of their QA pairs in the mix
      judge_share=0.8,  # judge examples per QA pair
      judge_context_share=0.7,  # judge examples that show the description
      judge_foreign_video_share=0.5,  # of those, shown another clip's video
      revision_share=0.25,  # revision examples per clip
  )
  # The tower is random and stays so (see demo.py); the projector and the
  # LLM learn to read it.
  config.sft.update(batch_size=16, epochs=2, learning_rate=2e-3)
  config.sampling.buckets = (64, 128, 256)
  config.sampling.answer.max_new_tokens = 12
  config.sampling.context.max_new_tokens = 96
  config.data.prompts_per_iteration = 0  # every question of the loop's clips
  # Step-by-step written verdicts (demo.py says why), parsed for their letter.
  config.self_judge.update(mode="generative", max_new_tokens=16, threshold=0.6)
  # DPO plus the chosen answers' cross-entropy (gamma 1), at lr 1e-3, the
  # projector trained with the LLM (as in SFT): the positive control gained
  # most so (docs/2026-12-03-demo-pi0.md).
  config.dpo.gamma = 1.0
  config.train.update(batch_size=16, epochs=2, learning_rate=1e-3,
                      frozen=(settings.VIDEO_TOWER,))
  config.eval.batch_size = 64
  return config
