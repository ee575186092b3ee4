"""The policy pi_t as the loop's stages use it: questions about videos in, text out.

One object holds what every stage needs to ask the model something: the model
on its mesh, the tokenizer and text encoder, the compiled sampler and video
reading. Stages give it (question, video) pairs and stable ids; it gives back
samples, or next-token log-probabilities for the likelihood judge.
"""
from collections.abc import Sequence
import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from isr_dpo_jax import bootstrap
from isr_dpo_jax import checkpoint
from isr_dpo_jax import distributed
from isr_dpo_jax import generate
from isr_dpo_jax import models
from isr_dpo_jax import sampling
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tokenize
from isr_dpo_jax.data import video as video_lib
from isr_dpo_jax.data import video_cache


def load_model(path: str | os.PathLike, *, mesh, template: str,
               max_length: int = 2048, family: str = models.registry.DEFAULT,
               dtype=jnp.float32, params_dir: str | os.PathLike | None = None):
  """(model, tokenizer, encoder): a model and what turns text into its inputs.

  The model of `family` from the checkpoint directory `path`, on `mesh`, its
  parameters float32 (master weights) computing in `dtype`; with the
  parameters that `checkpoint.save_params` wrote to `params_dir` instead of
  the checkpoint's, if given. The checkpoint's tokenizer, with the video
  token; the text encoder of the chat `template`.
  """
  model = models.load_pretrained(path, family=family, dtype=dtype,
                                 param_dtype=jnp.float32, mesh=mesh)
  if params_dir is not None:
    checkpoint.load_params(model, params_dir)
  tokenizer = models.load_tokenizer(path)
  tokenize.add_video_token(tokenizer)
  encoder = tokenize.TextEncoder(
      tokenizer, templates.resolve(template), model.video.token_id,
      model.video.num_tokens, max_length=max_length)
  return model, tokenizer, encoder


@dataclasses.dataclass
class Policy:
  """A model (models.VideoLanguageModel) with everything needed to prompt it."""
  model: models.VideoLanguageModel
  tokenizer: object
  encoder: tokenize.TextEncoder
  sampler: sampling.Sampler
  frames: video_cache.Frames  # video name -> uint8 frames
  batch_size: int
  buckets: tuple[int, ...]

  @classmethod
  def load(cls, path: str | os.PathLike, *, mesh, template: str,
           video_root: str | os.PathLike, batch_size: int,
           buckets: Sequence[int], max_length: int = 2048,
           params_dir: str | os.PathLike | None = None,
           family: str = models.registry.DEFAULT, dtype=jnp.float32,
           prepared_videos: str | os.PathLike | None = None) -> "Policy":
    """pi_0 from the checkpoint directory `path`; pi_t with the params saved
    in params_dir (see `load_model`).

    Videos are read from `prepared_videos` (video_cache.prepare) if given,
    else decoded from `video_root` each time.
    """
    model, tokenizer, encoder = load_model(
        path, mesh=mesh, template=template, max_length=max_length,
        family=family, dtype=dtype, params_dir=params_dir)
    frames = video_cache.Frames(video_root, model.video.num_frames,
                                model.video.frame_size, prepared_videos)
    return cls(model, tokenizer, encoder, sampling.Sampler(model, mesh),
               frames, batch_size, tuple(buckets))

  @classmethod
  def from_config(cls, config, setup: bootstrap.Setup, mesh,
                  params_dir: str | os.PathLike | None = None) -> "Policy":
    """The run's pi_0, or the policy saved in `params_dir`.

    Its batch size is this process's share of `config.sampling.batch_size`.
    """
    return cls.load(
        setup.init_checkpoint, mesh=mesh, template=config.data.template,
        video_root=setup.video_root,
        batch_size=distributed.per_process(config.sampling.batch_size,
                                           "sampling.batch_size"),
        buckets=config.sampling.buckets, max_length=config.data.max_length,
        params_dir=params_dir, family=config.model.family,
        dtype=jnp.dtype(config.model.dtype),
        prepared_videos=config.data.video_cache or None)

  def _stopping(self, params: sampling.SamplingParams) -> sampling.SamplingParams:
    """Stops at eos; never writes the video placeholder."""
    return dataclasses.replace(params, stop_ids=(self.tokenizer.eos_token_id,),
                               banned_ids=(self.model.video.token_id,))

  def video(self, name: str) -> np.ndarray:
    """float32 [T, S, S, 3] pixels of a video; raises video.VideoError."""
    return video_lib.normalize(self.frames(name))

  def _prompt(self, question: str | tuple[str, ...], video: np.ndarray,
              uid: int | None = None) -> generate.Prompt:
    """A question's prompt; several questions about one video (a judge's two
    orders) share their common start, each continuing it with its own rest
    (generate.Prompt.suffixes), which holds one token at least."""
    if isinstance(question, str):
      return generate.Prompt(self.encoder.prompt(question), video, uid)
    ids = [self.encoder.prompt(q) for q in question]
    common = 0
    while common < min(map(len, ids)) - 1 and len({x[common] for x in ids}) == 1:
      common += 1
    if any(self.model.video.token_id in x[common:] for x in ids):
      raise ValueError("questions sharing a video must differ after it")
    return generate.Prompt(ids[0][:common], video, uid,
                           tuple(x[common:] for x in ids))

  def sample(self, questions: Sequence[str | tuple[str, ...]],
             videos: Sequence[np.ndarray], uids: Sequence[int],
             params: sampling.SamplingParams, *, num_samples: int = 1,
             seed: int = 0) -> list[list[generate.Sample]]:
    """`num_samples` answers per (question, video), in order, from one prefill.

    A tuple of n questions about one video gets one answer to each (n
    samples), from one prefill of their common start (see `_prompt`).
    """
    prompts = [self._prompt(q, v, uid)
               for q, v, uid in zip(questions, videos, uids, strict=True)]
    params = self._stopping(params)
    return list(generate.generate(
        self.sampler, prompts, params, tokenizer=self.tokenizer,
        batch_size=self.batch_size, num_samples=num_samples, seed=seed,
        buckets=self.buckets, progress=False))

  def complete(self, texts: Sequence[str], params: sampling.SamplingParams, *,
               seed: int = 0) -> list[str]:
    """One answer per text-only question (no video), e.g. as an answer judge."""
    prompts = [generate.Prompt(self.encoder.prompt(t, with_video=False), None,
                               generate.stable_uid("complete", t))
               for t in texts]
    params = self._stopping(params)
    return [s[0].text for s in generate.generate(
        self.sampler, prompts, params, tokenizer=self.tokenizer,
        batch_size=self.batch_size, seed=seed, buckets=self.buckets, progress=False)]

  def letter_ids(self, letters: Sequence[str]) -> list[int]:
    """The token each letter starts with when it opens the answer (" A")."""
    ids = []
    for letter in letters:
      tokens, labels = self.encoder.encode([("?", letter)], with_video=False)
      ids.append(int(tokens[labels][0]))
    return ids

  def next_token_logprobs(self, questions: Sequence[str | tuple[str, ...]],
                          videos: Sequence[np.ndarray], token_ids: Sequence[int],
                          *, per_video: int = 1) -> np.ndarray:
    """log p(token | video, question) [N, len(token_ids)] after "ASSISTANT:".

    With per_video = n > 1 every question is a tuple of n about its video,
    giving n rows from one run of their common start (see `_prompt`).
    """
    prompts = [self._prompt(q, v) for q, v in zip(questions, videos, strict=True)]
    return generate.next_token_logprobs(
        self.sampler, prompts, token_ids, pad_id=self.tokenizer.pad_token_id,
        batch_size=self.batch_size, buckets=self.buckets,
        num_suffixes=per_video)
