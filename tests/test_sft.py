"""`isr-dpo sft` on the synthetic world: the loss falls and the model leaves in HF layout."""
import json

import jax
import numpy as np
import transformers

from isr_dpo_jax import models
from isr_dpo_jax import sft


def test_sft_learns_and_saves_a_loadable_checkpoint(tmp_path, load_config):
  config = load_config("smoke", **{"sft.learning_rate": 3e-3, "sft.epochs": 1,
                                   "sft.warmup_ratio": 0.0})
  out = sft.run(config, tmp_path)
  steps = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").open()]
  assert len(steps) >= 10
  first, last = np.mean([s["loss"] for s in steps[:3]]), np.mean([s["loss"] for s in steps[-3:]])
  assert last < 0.8 * first, (first, last)

  # The saved directory is a checkpoint like any other: ours and transformers'.
  model = models.load_pretrained(out)
  before = models.load_pretrained(tmp_path / "init")
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         jax.tree.leaves(model.language_model), jax.tree.leaves(before.language_model))
  assert all(changed)
  assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<video>") \
      == model.config.video_token_id
  hf = transformers.VideoLlavaForConditionalGeneration.from_pretrained(out)
  assert hf.config.text_config.hidden_size == model.config.text.hidden_size
