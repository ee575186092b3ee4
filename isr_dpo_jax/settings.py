"""A run's settings: their valid values, checks, and the typed views code takes.

`validate(config, command)` raises ConfigError (a one-line user error) for the
first value that cannot work: a choice that is not one of the choices, a
number out of its range, an input path that does not exist, or settings that
contradict each other. `unknown_key` words the error for a key the config
does not have, with the nearest key that it has.

The choices are defined here, and the code that acts on them uses these names.
So are the dataclasses that code takes (`TrainConfig`, `LoraConfig`,
`SamplingParams`) with their defaults, and the functions that build them from
a config's sections (`dpo_train_config`, `sft_train_config`,
`sampling_params`, `prompts`): the one place a config becomes typed settings.
defaults.py reads its defaults from these dataclasses. This module imports
nothing heavier than ml_collections and numpy (and light modules of this
package), so the command line checks a config before it imports jax or
touches a model.
"""
from collections.abc import Callable, Iterator
import dataclasses
import difflib
import os
import re
from typing import Any, Literal

import ml_collections

from isr_dpo_jax import errors
from isr_dpo_jax import judge
from isr_dpo_jax.data import templates
from isr_dpo_jax.eval import protocols
from isr_dpo_jax.eval import test_sets

JUDGE_MODES = judge.MODES  # self_judge.mode: the loop's judges (judges.py)
LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # dpo.loss_type
REFERENCES = ("previous", "initial")  # dpo.reference: pi_t or pi_0
SCHEDULES = ("linear", "cosine")  # train.schedule, sft.schedule
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype (compute)
SCORINGS = ("judge", "match")  # eval.scoring
# train.remat: the jax.checkpoint_policies that take no arguments, and
# offloading the layer inputs to host memory (train.remat_policy).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable",
                  "dots_saveable", "everything_saveable", "offload_layer_inputs")
MESH_AXES = ("data", "fsdp", "tensor")

# Parameter groups every model family names (models/interface.py).
VIDEO_TOWER = "video_tower"
PROJECTOR = "projector"
# Prompt text lengths (video tokens apart) that batches pad to: a stage
# compiles one program per bucket it meets (data/batching.py).
BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
# The LLM's attention and MLP projections (Video-LLaVA's Llama): LoRA's targets.
LLM_PROJECTIONS = (
    r"^language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 turns LoRA off (full fine-tuning); scale = alpha / rank (peft's)."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LLM_PROJECTIONS

  def __post_init__(self):
    if self.rank < 0 or self.alpha <= 0 or (self.rank and not self.targets):
      raise ValueError(f"LoRA needs rank >= 0, alpha > 0 and a target, got rank "
                       f"{self.rank}, alpha {self.alpha}, targets {self.targets}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training stage (train.Trainer); the defaults are the lineage's DPO recipe.

  LLaVA-Hound-DPO (docs/method.md, section 3): AdamW at 5e-7, linear decay
  after 10% warmup, beta 0.1, sigmoid loss, the video tower and projector
  frozen. `max_grad_norm` 1.0 and no weight decay are HF Trainer's defaults,
  which that recipe keeps. Weight decay, when set, skips 1-D parameters
  (norms and biases), as HF Trainer does. `remat` names a
  `jax.checkpoint_policies` policy applied to every decoder layer, e.g.
  "nothing_saveable" (keep only layer inputs) or
  "dots_with_no_batch_dims_saveable" (keep the projections, recompute
  attention and activations), or "offload_layer_inputs" (as
  "nothing_saveable", the layer inputs kept in host memory: for chips of
  16 GB); None stores everything. `grad_accum_steps`
  microbatches make one update (the batch must split evenly); `packed` puts
  prompt, chosen and rejected in one row per pair. `lora` with a rank > 0
  trains low-rank adapters on its target kernels instead of the model
  (lora.py); the whole model is then frozen and `frozen` is not used.
  """
  learning_rate: float = 5e-7
  schedule: Literal[SCHEDULES] = "linear"
  warmup_ratio: float = 0.1
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  grad_accum_steps: int = 1
  frozen: tuple[str, ...] = (VIDEO_TOWER, PROJECTOR)
  remat: str | None = None
  packed: bool = True
  beta: float = 0.1
  loss_type: Literal[LOSS_TYPES] = "sigmoid"
  label_smoothing: float = 0.0
  length_penalty: float = 0.0
  length_normalized: bool = False
  dpo_alpha: float = 1.0
  gamma: float = 0.0
  lora: LoraConfig = LoraConfig()

  def dpo_loss_options(self) -> dict[str, Any]:
    """Keyword arguments of `dpo.dpo_loss`."""
    names = ("beta", "loss_type", "label_smoothing", "length_penalty",
             "length_normalized")
    return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen and when a sample ends (static under jit).

  temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off.
  banned_ids are never produced (e.g. the video placeholder id).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 64
  stop_ids: tuple[int, ...] = ()
  banned_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise ValueError(
          f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def dpo_train_config(config: ml_collections.ConfigDict) -> TrainConfig:
  """The DPO update's recipe: config.train and config.dpo."""
  return _typed(TrainConfig, config.train, config.dpo,
                lora=_typed(LoraConfig, config.train.lora))


def sft_train_config(config: ml_collections.ConfigDict) -> TrainConfig:
  """The SFT update's recipe: config.sft, with the run's remat and LoRA."""
  return _typed(TrainConfig, config.sft, remat=config.train.remat,
                lora=_typed(LoraConfig, config.train.lora))


def sampling_params(section: ml_collections.ConfigDict) -> SamplingParams:
  """config.sampling.answer or .context as the sampler takes it."""
  return _typed(SamplingParams, section)


def prompts(config: ml_collections.ConfigDict) -> judge.Prompts:
  """The wording of contexts and judge questions (config.prompts)."""
  return _typed(judge.Prompts, config.prompts)


def _typed(cls, *sections: ml_collections.ConfigDict, **values):
  """A `cls` whose fields the sections' keys of the same names set (later
  sections and `values` win); lists become tuples, as the fields are."""
  names = {field.name for field in dataclasses.fields(cls)}
  from_sections = {key: tuple(value) if isinstance(value, list) else value
                   for section in sections for key, value in section.items()
                   if key in names}
  return cls(**(from_sections | values))


class ConfigError(errors.UserError):
  """A config value that cannot work; the message names its key."""


GROUND_TRUTH_WITHOUT_WORLD = (
    "self_judge.mode='ground_truth': this judge knows the answers of the "
    "synthetic world only, and config.world is None; set config.world or "
    "choose one of " + ", ".join(m for m in JUDGE_MODES if m != "ground_truth"))


# A check of one value: None if the value works, else what it must be.
Check = Callable[[object], str | None]


def _must(what: str, test: Callable[[object], bool]) -> Check:
  return lambda x: None if test(x) else what


def _one_of(choices: tuple[str, ...]) -> Check:
  def check(value):
    if value in choices:
      return None
    nearest = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
    return "one of " + ", ".join(choices) + hint
  return check


def _optional(check: Check) -> Check:
  def optional(value):
    problem = None if value is None else check(value)
    return problem and f"None or {problem}"
  return optional


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _compiles(pattern) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return True


def _is_template(spec) -> bool:
  try:
    templates.resolve(spec)
  except (KeyError, TypeError, ValueError):
    return False
  return True


INTEGER = _must("an integer", _is_int)
COUNT = _must("an integer >= 0", lambda x: _is_int(x) and x >= 0)
POSITIVE_INT = _must("an integer >= 1", lambda x: _is_int(x) and x >= 1)
POSITIVE = _must("a number > 0", lambda x: _is_number(x) and x > 0)
NON_NEGATIVE = _must("a number >= 0", lambda x: _is_number(x) and x >= 0)
SHARE = _must("a number in [0, 1]", lambda x: _is_number(x) and 0 <= x <= 1)
REGEXES = _must("a list of regular expressions", lambda x: isinstance(
    x, (list, tuple)) and all(map(_compiles, x)))
INCREASING = _must("increasing integers >= 1", lambda x: isinstance(
    x, (list, tuple)) and len(x) > 0 and all(_is_int(b) and b >= 1 for b in x)
                and list(x) == sorted(set(x)))


def _sampling_checks(key: str) -> list[tuple[str, Check]]:
  return [(f"{key}.temperature", NON_NEGATIVE), (f"{key}.top_k", COUNT),
          (f"{key}.top_p", _must("a number in (0, 1]",
                                 lambda x: _is_number(x) and 0 < x <= 1)),
          (f"{key}.max_new_tokens", POSITIVE_INT)]


def _stage_checks(key: str) -> list[tuple[str, Check]]:
  """The knobs that config.train and config.sft share."""
  return [(f"{key}.batch_size", POSITIVE_INT), (f"{key}.epochs", POSITIVE),
          (f"{key}.learning_rate", NON_NEGATIVE),
          (f"{key}.schedule", _one_of(SCHEDULES)),
          (f"{key}.warmup_ratio", SHARE), (f"{key}.weight_decay", NON_NEGATIVE),
          (f"{key}.frozen", REGEXES)]


CHECKS: list[tuple[str, Check]] = [
    ("seed", INTEGER),
    ("iterations", COUNT),
    ("model.dtype", _one_of(DTYPES)),
    ("data.template", _must("a registered template name or a template's "
                            "fields", _is_template)),
    ("data.max_length", POSITIVE_INT),
    ("data.prompts_per_iteration", COUNT),
    ("data.max_error_rate", SHARE),
    ("sampling.batch_size", POSITIVE_INT),
    ("sampling.batches_per_call", POSITIVE_INT),
    ("sampling.buckets", INCREASING),
    *_sampling_checks("sampling.answer"),
    *_sampling_checks("sampling.context"),
    ("self_judge.mode", _one_of(JUDGE_MODES)),
    ("self_judge.threshold", SHARE),
    ("self_judge.batch_size", POSITIVE_INT),
    ("self_judge.max_new_tokens", POSITIVE_INT),
    ("dpo.beta", POSITIVE),
    ("dpo.loss_type", _one_of(LOSS_TYPES)),
    ("dpo.label_smoothing", _must("a number in [0, 0.5)",
                                  lambda x: _is_number(x) and 0 <= x < 0.5)),
    ("dpo.length_penalty", NON_NEGATIVE),
    ("dpo.dpo_alpha", NON_NEGATIVE),
    ("dpo.gamma", NON_NEGATIVE),
    ("dpo.reference", _one_of(REFERENCES)),
    *_stage_checks("train"),
    ("train.max_grad_norm", _optional(POSITIVE)),
    ("train.grad_accum_steps", POSITIVE_INT),
    ("train.remat", _optional(_one_of(REMAT_POLICIES))),
    ("train.checkpoint_every", POSITIVE_INT),
    ("train.lora.rank", COUNT),
    ("train.lora.alpha", POSITIVE),
    ("train.lora.targets", REGEXES),
    *_stage_checks("sft"),
    ("eval.scoring", _one_of(SCORINGS)),
    ("eval.protocol", _one_of(tuple(protocols.PROTOCOLS))),
    ("eval.batch_size", POSITIVE_INT),
    ("eval.max_error_rate", SHARE),
]


def validate(config: ml_collections.ConfigDict, command: str) -> None:
  """Raises ConfigError for the first value of `config` that cannot work.

  `command` (an `isr-dpo` command) says which inputs must exist: `iterate` reads
  prompts, `sft` instruction data, `eval` test sets, and `demo` makes all of
  its own on the synthetic world.
  """
  for key, check in CHECKS:
    value = _get(config, key)
    if problem := check(value):
      raise ConfigError(f"{key}={value!r}: must be {problem}")
  _check_consistency(config)
  _check_inputs(config, command)


def keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every key of `config`, nested ones dotted ("dpo", "dpo.beta", ...)."""
  for name, value in config.items():
    yield prefix + name
    if isinstance(value, ml_collections.ConfigDict):
      yield from keys(value, f"{prefix}{name}.")


def unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
  """The error for a key `config` does not have, with the nearest that it has."""
  nearest = difflib.get_close_matches(key, list(keys(config)), n=1, cutoff=0.6)
  hint = f"; did you mean {nearest[0]}?" if nearest else ""
  return ConfigError(f"{key}: no such config key{hint}")


def _get(config: ml_collections.ConfigDict, key: str):
  value = config
  for name in key.split("."):
    value = value[name]
  return value


def _check_consistency(config: ml_collections.ConfigDict) -> None:
  if config.dpo.label_smoothing and config.dpo.loss_type != "sigmoid":
    raise ConfigError(
        f"dpo.label_smoothing={config.dpo.label_smoothing}: label smoothing "
        f"(cDPO) works with dpo.loss_type='sigmoid' only, not "
        f"{config.dpo.loss_type!r}")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(
        f"train.grad_accum_steps={config.train.grad_accum_steps} does not "
        f"divide train.batch_size={config.train.batch_size}")
  if config.train.lora.rank and not config.train.lora.targets:
    raise ConfigError(f"train.lora.rank={config.train.lora.rank} with no "
                      "train.lora.targets: LoRA would train nothing")
  mesh = dict(config.mesh)
  if (set(mesh) - set(MESH_AXES)
      or not all(_is_int(n) and (n >= 1 or n == -1) for n in mesh.values())
      or list(mesh.values()).count(-1) > 1):
    raise ConfigError(
        f"mesh={mesh}: must map axes of {', '.join(MESH_AXES)} to sizes >= 1, "
        "with at most one -1 (the devices left)")


def _check_inputs(config: ml_collections.ConfigDict, command: str) -> None:
  """The paths `command` reads exist; the synthetic world is on or off whole,
  and what needs it (the ground-truth judge) has it."""
  if config.world is not None:
    if config.data.video_root:
      raise ConfigError(
          f"data.video_root={config.data.video_root!r} is set, but config.world "
          "makes the synthetic world, which reads its own videos: add "
          "--config.world=None to run on your own data (with model.checkpoint "
          "and data.prompts), or leave data.video_root empty")
  elif command == "demo":
    raise ConfigError("world=None: the demo runs on the synthetic world; for "
                      "your own data use `isr-dpo sft`, `iterate` and `eval`")
  elif config.self_judge.mode == "ground_truth":
    raise ConfigError(GROUND_TRUTH_WITHOUT_WORLD)
  if command == "plan":  # compiles programs, reads no inputs
    return
  own_data = config.world is None
  needed = {"model.checkpoint": own_data, "data.video_root": own_data,
            "data.prompts": own_data and command == "iterate",
            "sft.data": own_data and command == "sft"}
  for key, required in needed.items():
    _check_path(config, key, required)
  if command == "eval":
    _check_path(config, "eval.params_dir", required=False)
    if config.eval.scoring == "judge" and config.eval.judge.local != "policy":
      _check_path(config, "eval.judge.local", required=False)
  if command == "eval" or (command == "iterate" and config.eval.enabled):
    _check_test_sets(config, own_data)


def _check_path(config, key: str, required: bool) -> None:
  path = _get(config, key)
  if not path:
    if required:
      raise ConfigError(f"{key} is empty: with world=None the run reads your "
                        f"own inputs; set --config.{key}=<path>")
  elif not os.path.exists(path):
    raise ConfigError(f"{key}={path!r}: no such file or directory")


def _check_test_sets(config, required: bool) -> None:
  """The evaluation's test sets: names under eval.test_root, or files."""
  names = list(config.eval.test_sets)
  if not names and required:
    raise ConfigError("eval.test_sets is empty: name the test sets to evaluate "
                      "on, or set eval.enabled=False")
  for name in names:
    try:
      _, path = test_sets.resolve_test_set(name, config.eval.test_root)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"eval.test_sets: {e}") from None
    if not path.is_file():
      raise ConfigError(f"eval.test_sets: {name!r} is not in eval.test_root: "
                        f"no file {path}")
