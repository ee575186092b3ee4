"""Configuration of the Video-LLaVA model and its translation to/from config.json.

Two on-disk layouts are understood (see checkpoints.py):
  * Hugging Face `VideoLlavaForConditionalGeneration` (model_type "video_llava"):
    `text_config` + `vision_config` (a plain CLIP vision tower).
  * The original Video-LLaVA / LLaVA-Hound `llava_llama` layout: LLaMA keys at the
    top level plus `mm_*` keys. Its config.json does not describe the LanguageBind
    video tower; `tower_from_original` says where that description comes from.
"""
import dataclasses
import json
import os
from typing import Literal

RopeType = Literal["linear", "llama3"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary scaling as transformers' `rope_parameters` (types linear, llama3)."""
  rope_type: RopeType
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA-family decoder; the defaults are Vicuna-7B v1.5."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A CLIP ViT applied per frame; the defaults are LanguageBind_Video_merge."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  num_frames: int = 8
  temporal_attention: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class VideoLlavaConfig:
  """Video tower -> feature selection -> projector -> merged into the LLM input.

  feature_layer indexes the tower's hidden states as transformers does (0 is the
  embedding output, -1 the last layer). feature_strategy "full" keeps the class
  token of every frame, "patch" drops it. video_token_id marks the placeholder
  positions in input_ids, one per visual embedding.
  """
  text: LlamaConfig = LlamaConfig()
  vision: VisionConfig = VisionConfig()
  feature_layer: int = -2
  feature_strategy: Literal["full", "patch"] = "full"
  projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
  projector_bias: bool = True
  video_token_id: int = 32001

  def __post_init__(self):
    if self.feature_strategy not in ("full", "patch"):
      raise ValueError(f"feature_strategy must be full or patch, got {self.feature_strategy!r}")
    if self.projector not in ("mlp2x_gelu", "linear"):
      raise ValueError(f"projector must be mlp2x_gelu or linear, got {self.projector!r}")
    if not 0 <= self.num_tower_layers <= self.vision.num_layers:
      raise ValueError(f"feature_layer {self.feature_layer} is outside a "
                       f"{self.vision.num_layers}-layer tower")

  @property
  def num_tower_layers(self) -> int:
    """Tower layers that feed the selected features (the rest are never built)."""
    if self.feature_layer < 0:
      return self.vision.num_layers + 1 + self.feature_layer
    return self.feature_layer

  @property
  def tokens_per_frame(self) -> int:
    return self.vision.num_patches + (self.feature_strategy == "full")

  @property
  def num_video_tokens(self) -> int:
    """Visual embeddings per video, i.e. placeholder ids per prompt."""
    return self.vision.num_frames * self.tokens_per_frame


# ---------------------------------------------------------------------------
# config.json <-> dataclasses
# ---------------------------------------------------------------------------


def _rope_from_dict(d: dict) -> tuple[float, RopeScaling | None]:
  """Reads transformers 5 `rope_parameters` or the older rope_theta/rope_scaling."""
  params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type not in ("linear", "llama3"):
    raise ValueError(f"unsupported rope type {rope_type!r} (supported: linear, llama3)")
  fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
  kwargs = {k: v for k, v in params.items() if k in fields}
  if rope_type == "llama3":
    kwargs.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
  return theta, RopeScaling(rope_type=rope_type, **kwargs)


def llama_from_dict(d: dict) -> LlamaConfig:
  theta, scaling = _rope_from_dict(d)
  return LlamaConfig(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=d["num_attention_heads"],
      num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
      head_dim=d.get("head_dim"),
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      tie_word_embeddings=d.get("tie_word_embeddings", False),
      attention_bias=d.get("attention_bias", False),
      mlp_bias=d.get("mlp_bias", False),
      hidden_act=d.get("hidden_act", "silu"))


def llama_to_dict(c: LlamaConfig) -> dict:
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    rope.update(dataclasses.asdict(c.rope_scaling))
  return {
      "model_type": "llama", "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "rms_norm_eps": c.rms_norm_eps,
      "rope_parameters": rope,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings,
      "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
      "hidden_act": c.hidden_act,
  } | ({"head_dim": c.head_dim} if c.head_dim else {})


def vision_from_dict(d: dict, *, temporal_attention: bool, num_frames: int) -> VisionConfig:
  return VisionConfig(
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=d["num_attention_heads"],
      image_size=d["image_size"],
      patch_size=d["patch_size"],
      layer_norm_eps=d.get("layer_norm_eps", 1e-5),
      hidden_act=d.get("hidden_act", "quick_gelu"),
      num_frames=d.get("num_frames", num_frames),
      temporal_attention=temporal_attention)


def vision_to_dict(c: VisionConfig, num_layers: int) -> dict:
  return {
      "model_type": "clip_vision_model", "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": num_layers,
      "num_attention_heads": c.num_heads, "image_size": c.image_size,
      "patch_size": c.patch_size, "layer_norm_eps": c.layer_norm_eps,
      "hidden_act": c.hidden_act, "num_channels": 3,
  }


def from_hf_dict(d: dict, *, num_frames: int = 8) -> VideoLlavaConfig:
  """Reads a transformers `VideoLlavaConfig` dict (plain CLIP tower, no temporal)."""
  vision = d.get("vision_config") or {}
  vision = {**_HF_VISION_DEFAULTS, **vision}
  layer = d.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"only a single vision_feature_layer is supported, got {layer!r}")
  act = d.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"only a gelu projector is supported, got {act!r}")
  return VideoLlavaConfig(
      # transformers ties the output head by the top-level flag.
      text=llama_from_dict({**d["text_config"],
                            "tie_word_embeddings": d.get("tie_word_embeddings", False)}),
      vision=vision_from_dict(vision, temporal_attention=False, num_frames=num_frames),
      feature_layer=layer,
      feature_strategy="full",  # HF's video path keeps the class token.
      projector="mlp2x_gelu",
      projector_bias=d.get("multimodal_projector_bias", True),
      video_token_id=d.get("video_token_index", d.get("video_token_id", 32001)))


def to_hf_dict(c: VideoLlavaConfig) -> dict:
  """A transformers VideoLlavaConfig dict that selects the same features.

  Only the tower layers the model holds are written, so the saved config says
  num_hidden_layers = num_tower_layers and vision_feature_layer = -1.
  """
  if c.vision.temporal_attention or c.projector != "mlp2x_gelu" or c.feature_strategy != "full":
    raise ValueError(
        "the Hugging Face VideoLlava layout has no temporal attention, no linear "
        "projector and keeps the class token; save this model with layout='original'")
  text = llama_to_dict(c.text)
  return {
      "architectures": ["VideoLlavaForConditionalGeneration"],
      "model_type": "video_llava",
      "text_config": text,
      "vision_config": vision_to_dict(c.vision, c.num_tower_layers),
      "vision_feature_layer": -1,
      "vision_feature_select_strategy": "full",
      "projector_hidden_act": "gelu",
      "multimodal_projector_bias": c.projector_bias,
      "video_token_index": c.video_token_id,
      "image_token_index": c.video_token_id - 1,
      "video_seq_length": c.num_video_tokens,
      "tie_word_embeddings": c.text.tie_word_embeddings,
  }


# LanguageBind_Video_merge (ViT-L/14, 224 px, 8 frames, temporal attention): the
# tower the released Video-LLaVA / LLaVA-Hound / ISR-DPO checkpoints were built on.
LANGUAGEBIND_VIDEO_MERGE = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
    "layer_norm_eps": 1e-5, "hidden_act": "gelu", "num_frames": 8,
    "add_time_attn": True,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
    "hidden_act": "quick_gelu",
}
# The original code marks the video with a single id (-201) that the model expands;
# static shapes need one placeholder per embedding, so an id outside the vocabulary
# is used for the expanded placeholders unless config.json names one.
ORIGINAL_VIDEO_TOKEN_ID = -201


def tower_from_original(d: dict, checkpoint_dir: str | os.PathLike) -> dict:
  """The LanguageBind tower description for an original-layout config.json.

  In order: a `video_tower_config` entry in config.json (what save_pretrained
  writes); else the config.json of the local folder named by `mm_video_tower`
  (its `vision_config` entry when it has one), resolved relative to the
  checkpoint directory; else the LanguageBind_Video_merge defaults.
  """
  if "video_tower_config" in d:
    return {**LANGUAGEBIND_VIDEO_MERGE, **d["video_tower_config"]}
  tower = d.get("mm_video_tower")
  if tower:
    path = os.path.join(checkpoint_dir, tower, "config.json")
    if os.path.isfile(path):
      with open(path) as f:
        local = json.load(f)
      return {**LANGUAGEBIND_VIDEO_MERGE, **local.get("vision_config", local)}
  return dict(LANGUAGEBIND_VIDEO_MERGE)


def from_original_dict(d: dict, tower: dict) -> VideoLlavaConfig:
  """Reads an original Video-LLaVA / LLaVA-Hound `llava_llama` config.json.

  The released Video-LLaVA code keeps every token of the selected video layer
  (its video `feature_select` returns all tokens, whatever
  `mm_vision_select_feature` says), so "full" is the default; a
  `mm_video_select_feature` entry (written by save_pretrained) overrides it.
  """
  projector = d.get("mm_projector_type", "linear")
  if projector not in ("linear", "mlp2x_gelu"):
    raise ValueError(f"unsupported mm_projector_type {projector!r}")
  return VideoLlavaConfig(
      text=llama_from_dict(d),
      vision=vision_from_dict(tower, temporal_attention=tower.get("add_time_attn", False),
                              num_frames=tower.get("num_frames", 8)),
      feature_layer=d.get("mm_vision_select_layer", -2),
      feature_strategy=d.get("mm_video_select_feature", "full"),
      projector=projector,
      video_token_id=d.get("video_token_index", ORIGINAL_VIDEO_TOKEN_ID))


def from_json(d: dict, checkpoint_dir: str | os.PathLike) -> tuple[VideoLlavaConfig, str]:
  """The config and layout ("hf" or "original") that a config.json describes."""
  if d.get("model_type") == "video_llava":
    return from_hf_dict(d), "hf"
  if "mm_video_tower" in d or d.get("model_type") == "llava_llama":
    return from_original_dict(d, tower_from_original(d, checkpoint_dir)), "original"
  raise ValueError(f"model_type {d.get('model_type')!r} is neither video_llava (Hugging "
                   "Face) nor llava_llama with mm_video_tower (original Video-LLaVA)")


def to_json(c: VideoLlavaConfig, layout: str) -> dict:
  """The config.json of a checkpoint in `layout` ("hf" or "original")."""
  return to_hf_dict(c) if layout == "hf" else to_original_dict(c)


def to_original_dict(c: VideoLlavaConfig) -> dict:
  text = llama_to_dict(c.text)
  text.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"])
  return {
      **text,
      "mm_video_tower": "LanguageBind/LanguageBind_Video_merge",
      # Both keys written: reading fills missing ones with LanguageBind's (8, True).
      "video_tower_config": vision_to_dict(c.vision, c.num_tower_layers) | {
          "num_frames": c.vision.num_frames, "add_time_attn": c.vision.temporal_attention},
      "mm_vision_select_layer": -1,
      "mm_video_select_feature": c.feature_strategy,
      "mm_projector_type": c.projector,
      "mm_hidden_size": c.vision.hidden_size,
      "video_token_index": c.video_token_id,
  }
