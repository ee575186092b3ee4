"""Every knob of an ISR-DPO run, with the defaults of METHOD.md.

Each experiment in configs/ starts from `get_config()` and changes what it needs.

Paper lineage (LLaVA-Hound-DPO): the DPO recipe (beta 0.1, lr 5e-7, linear
schedule with 10% warmup, 3 epochs, sigmoid loss, video tower and projector
frozen), answer sampling (temperature 1.0, top-p 0.95), the vicuna_v1
template. This project's choices where the paper is silent: the prompts of
judge.py, context sampling (temperature 0.7, top-p 0.9), the likelihood judge
with both orders averaged and its threshold, the length penalty and
length-normalised log-probs (off). Override any field on the command line:
`--config.dpo.beta=0.2`.
"""
import ml_collections

from isr_dpo_jax import bootstrap
from isr_dpo_jax import evaluate
from isr_dpo_jax import judge
from isr_dpo_jax import train
from isr_dpo_jax.data import batching


def world(**overrides) -> ml_collections.ConfigDict:
  """The built-in synthetic video world and its tiny model (bootstrap.py)."""
  config = bootstrap.world_config()
  config.update(overrides)
  return config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.iterations = 9
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Either a synthetic world (a ConfigDict, see `world`) or None with
  # model.checkpoint / data.prompts / data.video_root set.
  c.world = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  c.model = dict(
      family="video_llava",  # models/registry.py: video_llava, pooled_video_llava
      checkpoint="",  # pi_0: a directory in one of the family's layouts
      dtype="float32",  # compute dtype; parameters stay float32 (master weights)
  )
  c.data = dict(
      prompts="",  # QA jsonl of (video, question) prompts
      video_root="",
      video_cache="",  # videos prepared by `isr-dpo prepare-videos`; "": decode each time
      template="vicuna_v1",
      max_length=2048,
      prompts_per_iteration=0,  # 0: every prompt, every iteration
      fresh_prompts=False,  # a new sample of prompts each iteration
      max_error_rate=0.05,
  )
  c.sampling = dict(
      batch_size=8,
      buckets=batching.BUCKETS,  # prompt text lengths (video tokens apart)
      answer=dict(temperature=1.0, top_k=0, top_p=0.95, max_new_tokens=256),
      context=dict(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=512),
  )
  c.prompts = dict(
      first_context=judge.FIRST_CONTEXT,
      retrospective_context=judge.RETROSPECTIVE_CONTEXT,
      judge=judge.JUDGE,
      judge_context=judge.JUDGE_CONTEXT,
  )
  c.judge = dict(
      mode="likelihood",  # or "generative"
      threshold=0.6,  # least averaged P(winner) for a kept pair
      require_agreement=True,  # drop pairs whose two orders disagree
      use_context=True,  # ablation: False judges without c_t
      retrospective=True,  # ablation: False writes c_t from scratch
      batch_size=8,
      max_new_tokens=8,  # generative verdicts
  )
  c.dpo = dict(
      beta=0.1, loss_type="sigmoid", label_smoothing=0.0, length_penalty=0.0,
      length_normalized=False, dpo_alpha=1.0, gamma=0.0,
      reference="previous",  # pi_t (iterative DPO); "initial" keeps pi_0
  )
  defaults = train.TrainConfig()
  c.train = dict(
      batch_size=8, epochs=3, learning_rate=defaults.learning_rate,
      schedule=defaults.schedule, warmup_ratio=defaults.warmup_ratio,
      weight_decay=defaults.weight_decay, max_grad_norm=defaults.max_grad_norm,
      grad_accum_steps=1, frozen=defaults.frozen,
      remat=ml_collections.config_dict.placeholder(str), packed=True,
      checkpoint_every=50,
      # rank > 0: DPO and SFT train LoRA adapters on the kernels that `targets`
      # (regexes over parameter paths) match, scaled by alpha / rank; lora.py.
      lora=dict(rank=defaults.lora.rank, alpha=defaults.lora.alpha,
                targets=defaults.lora.targets),
  )
  c.sft = dict(
      data="",  # instruction jsonl (QA and caption conversations)
      batch_size=8, epochs=1, learning_rate=2e-5, schedule="cosine",
      warmup_ratio=0.03, weight_decay=0.0,
      frozen=("video_tower",),  # LLaVA's SFT trains projector and LLM
  )
  c.eval = evaluate.default_config()
  c.eval.enabled = True  # evaluate pi_t at the start of each iteration
  c.eval.params_dir = ""  # `isr-dpo eval`: a saved policy (iter_<t>/policy)
  c.eval.scoring = "match"
  c.eval.test_sets = []
  return c
