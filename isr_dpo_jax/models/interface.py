"""What the loop asks of a model: the interface a new base model implements.

Sampling (sampling.py, generate.py), training (train.py, packing.py) and the
policy (policy.py) use a model only through `VideoLanguageModel` below; a
family is registered by name in registry.py (docs/adding_a_model.md).

Shapes: B rows, L sequence positions, T frames of S x S pixels, N visual
embeddings per video, D the language model's hidden size, V its vocabulary.

The video in the sequence. A prompt with a video holds `video.num_tokens`
placeholder ids (`video.token_id`) where the video goes (data/tokenize.py
expands them); `embed` replaces the k-th placeholder of a row by the k-th
visual embedding. N is fixed per model (a config property), so every
sequence length is static: a family whose count depends on the video
(Qwen2-VL's dynamic resolution) fixes frames and resolution in its config.

Positions are int32 [B, L]: a token's index among its row's real tokens (0
at the first; left padding does not shift them). Three sites make them, from
masks alone: `data.batching.positions` (prompts), packing.py (the t-th token
of a response is at prompt length + t, restarting for each response of a
packed row) and sampling.py's decode step (the previous position + 1). A
family with K-component positions (Qwen2-VL's M-RoPE: time, height, width)
would widen them to [B, L, K], made for prompts by a model method from ids
and mask (its video tokens take the video's first index plus their frame,
row and column in the grid; the text after it the index shifted by one
constant of the model, the grid extent minus N), and continued at the other
two sites as last prompt position + 1 + t on every component, which M-RoPE
gives text after a video.

The cache is the model's own pytree: `prefill` makes it, `decode` updates it
(donated to the decode step, so updates may be in place); callers read only
`index`, the next slot to write. models/llama.py documents the KV cache that
the LLaMA decoder implements.
"""
import dataclasses
from typing import ClassVar, Protocol

import jax

# Parameter groups every family names (see `parameter_groups`); defined with
# the settings that name them (train.frozen, sft.frozen).
from isr_dpo_jax.settings import PROJECTOR, VIDEO_TOWER


@dataclasses.dataclass(frozen=True)
class VideoInput:
  """A model's video contract: the frames it reads, the tokens it puts in."""
  num_frames: int  # frames sampled per video
  frame_size: int  # square frames of frame_size^2 pixels, CLIP-normalised
  token_id: int  # the placeholder id of a visual embedding
  num_tokens: int  # visual embeddings per video, one placeholder each

  @property
  def frames_shape(self) -> tuple[int, int, int, int]:
    """[T, S, S, 3]: one video as the model takes it."""
    return (self.num_frames, self.frame_size, self.frame_size, 3)


class Cache(Protocol):
  """Decoding state that `prefill` makes and `decode` updates (a pytree)."""
  index: jax.Array  # int32 scalar: the slot the next token is written to.


class VideoLanguageModel(Protocol):
  """A video LMM as sampling, packing, training and the policy use it (NNX).

  Built by `Family.model(config, rngs=, dtype=, param_dtype=)`; `dtype` is
  the compute dtype, `param_dtype` the stored one.
  """

  # Group name -> regex over parameter paths ('video_tower/layers/0/...',
  # joined by '/'). VIDEO_TOWER: the parameters `tower_features` reads;
  # PROJECTOR: those `project` reads; both are what TrainConfig.frozen names
  # by default. A path in neither group belongs to the language model.
  parameter_groups: ClassVar[dict[str, str]]

  @property
  def video(self) -> VideoInput:
    """The video contract, from the config."""

  def tower_features(self, videos_BxTxSxSx3: jax.Array) -> jax.Array:
    """Features of the video tower [B, N, Dv], before projection.

    Reads only the VIDEO_TOWER group, so a trainer with a frozen tower runs it
    once per batch outside the differentiated function.
    """

  def project(self, features_BxNxDv: jax.Array) -> jax.Array:
    """Tower features -> visual embeddings [B, N, D] (the PROJECTOR group)."""

  def encode_video(self, videos_BxTxSxSx3: jax.Array) -> jax.Array:
    """Visual embeddings [B, N, D]: `project(tower_features(videos))`."""

  def embed(self, ids_BxL: jax.Array,
            visual_BxNxD: jax.Array | None = None) -> jax.Array:
    """Input embeddings [B, L, D]: token embeddings, with the k-th placeholder
    of row b set to visual_BxNxD[b, k]. Rows hold N placeholders each, or
    none when visual is None (text-only prompts)."""

  def hidden_states(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                    mask=None, cache: Cache | None = None, *,
                    remat_policy=None, last_only=False) -> tuple[jax.Array, Cache | None]:
    """Final hidden states [B, L, D] (output head not applied), and the cache.

    mask: None (causal), [B, L] real keys (and causal), or [B, L, L] as given
    (packed rows, packing.py). `logits(hidden_states(...)[0][:, i])` equals
    the full forward at positions i, so callers run the output head only
    where they read it. remat_policy: a `jax.checkpoint_policies` policy for
    the backward pass. last_only (with a cache): only the last position's
    [B, 1, D] is returned, and the last layer may skip the other queries; the
    cache still gets every position's keys.
    """

  def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
    """The output head [..., V] on any selection of hidden states."""

  def prefill(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
              mask_BxL: jax.Array, max_len: int, dtype=None,
              num_samples: int = 1) -> tuple[jax.Array, Cache]:
    """Left-padded prompts -> (the final hidden state [B, D] after each, a
    cache for B * n rows).

    Left padding puts every prompt's last token at position L - 1, so only
    that position's hidden state is needed (logits of the first new token),
    and the last layer may skip the others. Row b * n + j of the cache
    continues prompt b (sample j); it has max_len slots in all, L of them the
    prompt's, and `index` = L. dtype: the cache's.
    """

  def decode(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, mask_BxS,
             cache: Cache) -> tuple[jax.Array, Cache]:
    """Logits [B, L, V] of L new tokens written at slots [index, index + L),
    and the cache with index += L; mask_BxS marks the slots holding real
    tokens, the new ones included. The caller keeps index + L <= max_len."""
