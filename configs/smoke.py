"""The smallest complete ISR-DPO run: a tiny random model on the synthetic world.

Two iterations over a few dozen prompts in about two minutes on 2 CPU cores;
the end-to-end tests and CI use it.
"""
from isr_dpo_jax import defaults


def get_config():
  config = defaults.get_config()
  config.iterations = 2
  config.world = defaults.world(num_videos=dict(train=12, test=8))
  config.data.prompts_per_iteration = 16
  config.sampling.batch_size = 8
  config.sampling.answer.max_new_tokens = 12
  config.sampling.context.max_new_tokens = 16
  config.self_judge.batch_size = 8
  # A random model's letter bias beats any content: keep pairs on the average.
  config.self_judge.threshold = 0.5
  config.self_judge.require_agreement = False
  config.train.batch_size = 8
  config.train.epochs = 1
  config.train.learning_rate = 1e-3
  config.eval.enabled = False
  return config
