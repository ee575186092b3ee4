"""Every knob of an ISR-DPO run, with the defaults of docs/method.md.

Each experiment in configs/ starts from `get_config()` and changes what it needs.

Paper lineage (LLaVA-Hound-DPO): the DPO recipe (beta 0.1, lr 5e-7, linear
schedule with 10% warmup, sigmoid loss, video tower and projector frozen; the
defaults of settings.TrainConfig, read from there) for 3 epochs, answer
sampling (temperature 1.0, top-p 0.95), the vicuna_v1 template. This
project's choices where the paper is silent: the prompts of judge.py, context
sampling (temperature 0.7, top-p 0.9), the likelihood self-judge with both
orders averaged and its threshold, the length penalty and length-normalised
log-probs (off). Override any field on the command line:
`--config.dpo.beta=0.2`.

Configs are data: this module and the configs import nothing heavier than
ml_collections (settings.py turns a config into the typed settings the code
takes), so loading one imports no jax.
"""
import dataclasses

import ml_collections

from isr_dpo_jax import judge
from isr_dpo_jax import settings


def world(**overrides) -> ml_collections.ConfigDict:
  """The built-in synthetic video world and the tiny model trained on it
  (isr_dpo_jax/world/)."""
  config = ml_collections.ConfigDict(dict(
      seed=0,
      dir="",  # where it is written; "": <workdir>/world
      num_videos=dict(train=32, test=16),
      num_frames=8,
      size=32,
      vocab_size=768,
      model=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, vision_hidden_size=32, vision_layers=2,
                 vision_heads=2, patch_size=8),
  ))
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
      # Sampling batches per call of the answer and context stages: the
      # engine's slots refill from them (continuous batching). A call is the
      # unit of resume and holds its items' decoded videos.
      batches_per_call=8,
      buckets=settings.BUCKETS,  # prompt text lengths (video tokens apart)
      answer=dict(temperature=1.0, top_k=0, top_p=0.95, max_new_tokens=256),
      context=dict(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=512),
  )
  c.prompts = dataclasses.asdict(judge.Prompts())  # judge.py's wording
  # The loop's judge of its own answers (judges.py); eval.judge is the
  # evaluation's.
  c.self_judge = dict(
      # likelihood: pi_t's letter odds; generative: pi_t's written verdicts;
      # ground_truth: the synthetic world's answers (config.world only).
      mode="likelihood",
      threshold=0.6,  # least averaged P(winner) for a kept pair
      require_agreement=True,  # drop pairs whose two orders disagree
      use_context=True,  # ablation: False judges without c_t
      retrospective=True,  # ablation: False writes c_t from scratch
      batch_size=8,
      max_new_tokens=8,  # generative verdicts
  )
  recipe = settings.TrainConfig()
  c.dpo = dict(
      beta=recipe.beta, loss_type=recipe.loss_type,
      label_smoothing=recipe.label_smoothing,
      length_penalty=recipe.length_penalty,
      length_normalized=recipe.length_normalized, dpo_alpha=recipe.dpo_alpha,
      gamma=recipe.gamma,
      reference="previous",  # pi_t (iterative DPO); "initial" keeps pi_0
  )
  c.train = dict(
      batch_size=8, epochs=3, learning_rate=recipe.learning_rate,
      schedule=recipe.schedule, warmup_ratio=recipe.warmup_ratio,
      weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
      grad_accum_steps=recipe.grad_accum_steps, frozen=recipe.frozen,
      remat=ml_collections.config_dict.placeholder(str), packed=recipe.packed,
      checkpoint_every=50,
      # rank > 0: DPO and SFT train LoRA adapters on the kernels that `targets`
      # (regexes over parameter paths) match, scaled by alpha / rank; lora.py.
      lora=dict(rank=recipe.lora.rank, alpha=recipe.lora.alpha,
                targets=recipe.lora.targets),
  )
  c.sft = dict(
      data="",  # instruction jsonl (QA and caption conversations)
      batch_size=8, epochs=1, learning_rate=2e-5, schedule="cosine",
      warmup_ratio=0.03, weight_decay=0.0,
      frozen=(settings.VIDEO_TOWER,),  # LLaVA's SFT trains projector and LLM
  )
  c.eval = dict(
      enabled=True,  # `isr-dpo iterate`: evaluate pi_t at the start of each iteration
      params_dir="",  # `isr-dpo eval`: a saved policy (iter_<t>/policy)
      # Names under test_root (eval/test_sets.py, e.g. its OUT_DOMAIN) or
      # files. A tuple, so that the command line can set it:
      # --config.eval.test_sets="('msvd', 'msrvtt', 'tgif')".
      test_sets=(),
      # Folder of `{name}.qa.jsonl`: video_instruction/test of
      # ShareGPTVideo/test_video_and_instruction.
      test_root=ml_collections.config_dict.placeholder(str),
      max_error_rate=0.01,  # share of bad test-file lines that stops the run
      batch_size=32,  # records per answer_fn call
      scoring="match",  # "judge" (eval.judge below) or "match" (checker, no judge)
      # "caption_grounded" (ISR-DPO's) or "video_chatgpt" (the protocol of
      # LLaVA-Hound-DPO's published MSVD/MSRVTT/TGIF table): eval/protocols.py.
      protocol="caption_grounded",
      # The evaluation's judge: an OpenAI-compatible endpoint, with the
      # published protocol's model, or a local one.
      judge=dict(
          model="gpt-3.5-turbo-0301",
          base_url=ml_collections.config_dict.placeholder(str),  # else OPENAI_BASE_URL
          api_key=ml_collections.config_dict.placeholder(str),  # else OPENAI_API_KEY
          cache_path=ml_collections.config_dict.placeholder(str),  # else workdir/judge_cache
          concurrency=8,
          max_retries=6,
          timeout_s=60.0,
          backoff_s=1.0,
          batch_size=64,  # prompts per judge call (judgments saved after each)
          # `isr-dpo eval` with a local judge instead of the endpoint: "policy"
          # (the evaluated model itself, for quick looks) or a checkpoint dir.
          local="",
          max_new_tokens=128,
      ),
  )
  return c
