"""Judge backends: any callable from prompts to replies.

`OpenAIJudge` talks to any OpenAI-compatible chat-completions endpoint
(OpenAI, vLLM, SGLang, ...) through the `openai` client, with
bounded concurrency, exponential backoff on 429, 5xx, timeouts and dropped
connections, and an on-disk reply cache so that a rerun pays for nothing twice.
Before its first request it checks that the endpoint takes connections at all,
and it logs the prompts left without a reply once per cause, not per attempt.
A local model is a judge too: any function with the `Judge` signature, called
on batches of prompts.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import operator
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

import openai

from isr_dpo_jax.data import records

# Replies, one per prompt (the user message of a judge protocol; the judge
# adds the protocol's system message, if any); None where no reply could be
# had (counted, retried on the next run).
Judge = Callable[[Sequence[str]], list[str | None]]

# Configuration errors: every request would fail the same way, so stop.
_FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError,
                 openai.NotFoundError)


class JudgeUnreachable(RuntimeError):
  """The endpoint takes no connection: every request would fail."""


@dataclasses.dataclass(frozen=True)
class _NoReply:
  cause: str  # the last error, after any retries


@dataclasses.dataclass
class JudgeStats:
  requests: int = 0  # HTTP attempts, retries included
  retries: int = 0
  cache_hits: int = 0
  errors: int = 0  # prompts left without a reply


def _is_transient(error: Exception) -> bool:
  if isinstance(error, openai.APIConnectionError):  # timeouts included
    return True
  return isinstance(error, openai.APIStatusError) and (
      error.status_code in (408, 409, 429) or error.status_code >= 500)


def _describe(error: Exception) -> str:
  return f"{type(error).__name__}: {error}"


def cache_key(request: dict) -> str:
  """Hash of everything that decides the reply: model, messages, sampling."""
  text = json.dumps(request, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


class OpenAIJudge:
  """A `Judge` over an OpenAI-compatible chat-completions endpoint.

  base_url and api_key fall back to OPENAI_BASE_URL and OPENAI_API_KEY (the
  client's own defaults). Each prompt is the user message, after `system` as
  the system message when given. Replies are cached in `cache_path` (jsonl)
  keyed by `cache_key`; `stats` counts requests, retries, cache hits and
  errors. Close it (or use it in a `with` block) to sync the cache to disk.
  """

  def __init__(self, *, model: str, base_url: str | None = None,
               api_key: str | None = None,
               cache_path: str | os.PathLike[str] | None = None,
               concurrency: int = 8, max_retries: int = 6,
               timeout_s: float = 60.0, backoff_s: float = 1.0,
               max_backoff_s: float = 60.0, temperature: float = 0.0,
               system: str | None = None):
    # Retries are ours (max_retries=0 here) so that they are counted.
    self._client = openai.OpenAI(base_url=base_url, api_key=api_key,
                                 timeout=timeout_s, max_retries=0)
    self.model = model
    self.temperature = temperature
    self.system = system
    self.concurrency = concurrency
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self._cache = None
    self._cached: dict[str, str] = {}  # key -> reply
    if cache_path:
      self._cache = records.JsonlAppender(cache_path,
                                          operator.itemgetter("key"))
      self._cached = {row["key"]: row["reply"] for row in self._cache.records}
    self.stats = JudgeStats()
    self._lock = threading.Lock()
    self._reachable = False  # checked before the first request

  def close(self) -> None:
    if self._cache is not None:
      self._cache.close()
    self._client.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def url(self) -> str:
    return str(self._client.base_url)

  def __call__(self, prompts: Sequence[str]) -> list[str | None]:
    """Replies to `prompts`; None for each prompt that got none (logged).

    Raises:
      JudgeUnreachable: before the first request, when the endpoint refuses
        the connection (or times out).
    """
    requests = [self._chat_request(p) for p in prompts]
    if not self._reachable and any(cache_key(r) not in self._cached
                                   for r in requests):
      self.check_reachable()
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      replies = list(pool.map(self._reply, requests))
    causes = collections.Counter(r.cause for r in replies
                                 if isinstance(r, _NoReply))
    for cause, count in causes.items():
      logging.warning("judge at %s: no reply to %d of %d prompts: %s",
                      self.url, count, len(prompts), cause)
    return [None if isinstance(r, _NoReply) else r for r in replies]

  def _chat_request(self, prompt: str) -> dict:
    system = [{"role": "system", "content": self.system}] if self.system else []
    return dict(model=self.model, temperature=self.temperature,
                messages=system + [{"role": "user", "content": prompt}])

  def check_reachable(self) -> None:
    """Raises JudgeUnreachable unless the endpoint answers a GET of /models.

    OpenAI, vLLM and SGLang serve /models; any HTTP answer, an error status
    included, shows that the endpoint is there. Called before the first
    request that the cache cannot answer, or earlier by the caller.
    """
    try:
      self._client.models.list()
    except openai.APIConnectionError as e:
      raise JudgeUnreachable(
          f"the judge endpoint {self.url} cannot be reached: {e}") from None
    except openai.OpenAIError:
      pass
    self._reachable = True

  def _reply(self, request: dict) -> str | _NoReply:
    """The reply to one request, from the cache if it is there."""
    key = cache_key(request)
    if (hit := self._cached.get(key)) is not None:
      self._count("cache_hits")
      return hit
    reply = self._request(request)
    if isinstance(reply, _NoReply):
      self._count("errors")
      return reply
    with self._lock:
      if self._cache is not None and key not in self._cached:
        self._cache.append({"key": key, "model": self.model, "reply": reply})
      self._cached[key] = reply
    return reply

  def _request(self, request: dict) -> str | _NoReply:
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._count("retries")
        delay = min(self.backoff_s * 2**(attempt - 1), self.max_backoff_s)
        time.sleep(delay * random.uniform(0.75, 1.0))  # jitter de-syncs threads
      self._count("requests")
      try:
        completion = self._client.chat.completions.create(**request)
        reply = completion.choices[0].message.content
        if not isinstance(reply, str):
          raise TypeError(f"no text in the reply: {completion!r:.200}")
        return reply
      except _FATAL_ERRORS:
        raise
      except openai.OpenAIError as e:
        if not _is_transient(e):
          return _NoReply(_describe(e))
        logging.debug("judge request attempt %d failed: %s", attempt + 1, e)
        last_error = e
      except (ValueError, TypeError, IndexError, AttributeError) as e:
        return _NoReply(f"malformed reply: {_describe(e)}")
    return _NoReply(f"{_describe(last_error)} ({attempt + 1} attempts)")

  def _count(self, field: str) -> None:
    with self._lock:
      setattr(self.stats, field, getattr(self.stats, field) + 1)
