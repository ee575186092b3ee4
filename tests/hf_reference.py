"""Tiny random transformers VideoLlava models and inputs for the model tests."""
import numpy as np
import tokenizers
import torch
import transformers

VOCAB = 96
VIDEO_ID = 95
IMAGE_ID = 94
NUM_FRAMES = 8  # transformers' video path and our default tower: 8 frames.
IMAGE_SIZE = 28  # 2 x 2 patches of 14 px: 5 tokens per frame with the class token.


def tiny_config(num_kv_heads: int = 2, text: dict | None = None, vision: dict | None = None,
                tie_word_embeddings: bool = False) -> transformers.VideoLlavaConfig:
  text_config = dict(model_type="llama", hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=num_kv_heads, vocab_size=VOCAB, pad_token_id=0,
                     rms_norm_eps=1e-5, initializer_range=0.2,
                     **(text or {}))
  vision_config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                       initializer_range=0.2,
                       **(vision or {}))
  return transformers.VideoLlavaConfig(vision_config=vision_config, text_config=text_config,
                                       image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
                                       tie_word_embeddings=tie_word_embeddings)


def tiny_model(seed: int = 0, **config_kwargs) -> transformers.VideoLlavaForConditionalGeneration:
  torch.manual_seed(seed)
  model = transformers.VideoLlavaForConditionalGeneration(tiny_config(**config_kwargs))
  return model.eval()


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A tokenizer of the tiny models' vocabulary: id i is the word "w<i>", 0 pads."""
  vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def videos(batch: int, seed: int = 0) -> np.ndarray:
  """Random normalised frames, channels-last [B, T, H, W, 3]."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


def video_prompts(prompt_lengths: list[int], num_video_tokens: int, seed: int = 0):
  """Left-padded prompts [B, L]: text, the video placeholders, text; and the mask."""
  rng = np.random.default_rng(seed)
  length = max(prompt_lengths) + num_video_tokens
  ids = np.zeros((len(prompt_lengths), length), np.int64)
  mask = np.zeros_like(ids)
  for row, n in enumerate(prompt_lengths):
    text = rng.integers(3, IMAGE_ID, n)
    split = n // 2
    row_ids = np.concatenate([text[:split], np.full(num_video_tokens, VIDEO_ID), text[split:]])
    ids[row, length - row_ids.size:] = row_ids
    mask[row, length - row_ids.size:] = 1
  return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@torch.no_grad()
def logits(model, ids, mask, frames=None) -> np.ndarray:
  """transformers logits with positions counted over real tokens (as generate does)."""
  pixels = None if frames is None else torch.from_numpy(frames).permute(0, 1, 4, 2, 3)
  out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              position_ids=torch.from_numpy(positions(mask)), pixel_values_videos=pixels)
  return out.logits.numpy()
