"""The endpoint judge against a local chat-completions server.

The server runs on 127.0.0.1 in a thread; a tag in each prompt picks its
behaviour (normal and score-less replies, invalid JSON, 429 and 500 responses,
replies slower than the client's timeout), so that results, retries, cache hits
and parse failures can be checked exactly. An endpoint that takes no
connection is a port bound on 127.0.0.1 that does not listen.
"""
import collections
import http.server
import json
import logging
import re
import socket
import threading
import time

import openai
import pytest

from isr_dpo_jax import defaults
from isr_dpo_jax import evaluate
from isr_dpo_jax.eval import judge_client
from isr_dpo_jax.eval import judge_prompt
from isr_dpo_jax.eval import test_sets
from isr_dpo_jax.eval import video_chatgpt_prompt

TIMEOUT_S = 0.2
SLOW_S = 0.6
MAX_RETRIES = 2


def _completion(text):
  return {"id": "cmpl-0", "object": "chat.completion", "created": 0,
          "model": "judge-test", "choices": [{
              "index": 0, "finish_reason": "stop",
              "message": {"role": "assistant", "content": text}}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                    "total_tokens": 2}}


class _ChatServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.lock = threading.Lock()
    self.attempts = collections.Counter()  # tag -> requests received
    self.in_flight = self.max_in_flight = 0
    self.bodies = []
    self.auth_headers = set()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
  """Replies by the [tag] in the user message: ok:N, dict:yes|no:N (a
  Video-ChatGPT-style reply), noscore, badjson, 429xK and 500xK (K failures,
  then ok), 500 (always; also without a tag), slow (past the timeout), busy
  (briefly), 401."""

  def do_POST(self):
    with self.server.lock:
      self.server.in_flight += 1
      self.server.max_in_flight = max(self.server.max_in_flight,
                                      self.server.in_flight)
    try:
      self._reply()
    finally:
      with self.server.lock:
        self.server.in_flight -= 1

  def _reply(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    tagged = re.search(r"\[(.*?)\]", body["messages"][-1]["content"])
    tag = tagged.group(1) if tagged else "500"
    with self.server.lock:
      self.server.attempts[tag] += 1
      attempt = self.server.attempts[tag]
      self.server.bodies.append(body)
      self.server.auth_headers.add(self.headers["Authorization"])
    kind, _, arg = tag.partition(":")
    if kind in ("slow", "busy"):
      time.sleep(SLOW_S if kind == "slow" else 0.05)
    if m := re.fullmatch(r"(429|500)x(\d)", kind):
      status = int(m[1]) if attempt <= int(m[2]) else 200
    else:
      status = {"500": 500, "401": 401}.get(kind, 200)
    if status != 200:
      self._send(status, json.dumps({"error": {"message": tag}}).encode())
    elif kind == "badjson":
      self._send(200, b'{"choices": [')
    elif kind == "dict":
      pred, _, score = arg.partition(":")
      self._send(200, json.dumps(_completion(
          f"{{'pred': '{pred}', 'score': {score}}}")).encode())
    elif kind == "noscore":
      self._send(200, json.dumps(_completion(
          "Explanation: I cannot tell.")).encode())
    else:
      score = arg or "5"
      self._send(200, json.dumps(_completion(
          f"Explanation: matches the caption.\nScore: {score}")).encode())

  def _send(self, status, data):
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client timed out and left

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  server = _ChatServer()
  thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                            daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


@pytest.fixture
def closed_url():
  """The URL of an endpoint that refuses every connection."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def _judge(server, cache_path, url=None):
  return judge_client.OpenAIJudge(
      model="judge-test", base_url=url or server.url, api_key="sk-test",
      cache_path=cache_path, concurrency=4, max_retries=MAX_RETRIES,
      timeout_s=TIMEOUT_S, backoff_s=0.01)


PROMPTS = ["a [ok:4]", "b [noscore]", "c [badjson]", "d [429x2]",
           "e [500x1]", "f [500]", "g [slow]"]


def test_results_retries_errors_and_cache(server, tmp_path):
  with _judge(server, tmp_path / "cache.jsonl") as judge:
    replies = judge(PROMPTS)

  assert [None if r is None else judge_prompt.parse_score(r)
          for r in replies] == [4.0, None, None, 5.0, 5.0, None, None]
  assert replies[1] == "Explanation: I cannot tell."
  # 429 twice then ok; 500 once then ok; always-500 and too-slow use up the
  # retries; malformed bodies are not retried.
  assert dict(server.attempts) == {
      "ok:4": 1, "noscore": 1, "badjson": 1, "429x2": 3, "500x1": 2,
      "500": 1 + MAX_RETRIES, "slow": 1 + MAX_RETRIES}
  assert judge.stats == judge_client.JudgeStats(
      requests=sum(server.attempts.values()), retries=2 + 1 + 2 * MAX_RETRIES,
      cache_hits=0, errors=3)
  assert {b["temperature"] for b in server.bodies} == {0.0}
  assert {b["model"] for b in server.bodies} == {"judge-test"}
  assert all(b["messages"] == [{"role": "user", "content": b["messages"][0][
      "content"]}] for b in server.bodies)
  assert server.auth_headers == {"Bearer sk-test"}

  # A rerun pays for nothing twice: answered prompts come from the cache.
  answered = [p for p, r in zip(PROMPTS, replies) if r is not None]
  server.attempts.clear()
  with _judge(server, tmp_path / "cache.jsonl") as rerun:
    assert rerun(answered) == [r for r in replies if r is not None]
    assert rerun.stats == judge_client.JudgeStats(cache_hits=4)
    assert not server.attempts
    # Failures were not cached: asking again reaches the server again.
    assert rerun(["c [badjson]"]) == [None]
    assert server.attempts == {"badjson": 1}


def test_failures_are_logged_once_per_cause_with_the_url(server, caplog):
  with _judge(server, None) as judge, caplog.at_level(logging.INFO):
    replies = judge([f"{i} [500]" for i in range(6)] + ["ok [ok:4]"])
  assert replies[:6] == [None] * 6 and replies[6] is not None
  assert server.attempts["500"] == 6 * (1 + MAX_RETRIES)
  assert [r.getMessage() for r in caplog.records if r.name == "root"] == [
      f"judge at {judge.url}: no reply to 6 of 7 prompts: InternalServerError: "
      f"Error code: 500 - 500 ({1 + MAX_RETRIES} attempts)"]


def test_a_closed_endpoint_fails_before_any_request_unless_all_is_cached(
    server, closed_url, tmp_path):
  with _judge(server, tmp_path / "cache.jsonl") as judge:
    cached = judge(["a [ok:4]"])
  with _judge(server, tmp_path / "cache.jsonl", url=closed_url) as judge:
    assert judge(["a [ok:4]"]) == cached
    with pytest.raises(judge_client.JudgeUnreachable,
                       match=re.escape(closed_url)):
      judge(["a [ok:4]", "b [ok:3]"])
    assert judge.stats == judge_client.JudgeStats(cache_hits=1)


def test_concurrency_is_bounded(server):
  with _judge(server, None) as judge:
    replies = judge([f"{i} [busy]" for i in range(12)])
  assert all(judge_prompt.parse_score(r) == 5.0 for r in replies)
  assert 1 < server.max_in_flight <= judge.concurrency == 4


def test_bad_credentials_stop_the_run(server):
  with _judge(server, None) as judge, pytest.raises(openai.AuthenticationError):
    judge(["x [401]"])


def test_evaluation_with_the_endpoint_from_the_environment(server, tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv("OPENAI_BASE_URL", server.url)
  monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
  tags = ["ok:4", "ok:2", "noscore", "500", "ok:3"]
  rows = [{"id": f"q{i}", "video": f"v{i}", "caption": f"[{tag}] caption",
           "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                             {"from": "gpt", "value": "This."}]}
          for i, tag in enumerate(tags)]
  path = tmp_path / "mini.qa.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = defaults.get_config().eval
  config.update(test_sets=[str(path)], scoring="judge")
  config.judge.update(model="judge-test", max_retries=1, backoff_s=0.01,
                      timeout_s=TIMEOUT_S, batch_size=2)

  def answer_fn(records: list[test_sets.QARecord]):
    return ["It is this one." for _ in records]

  (row,) = evaluate.evaluate(config, tmp_path / "eval", answer_fn)
  assert (row.n, row.scored, row.parse_failures, row.unjudged) == (5, 3, 1, 1)
  assert row.accuracy == pytest.approx(2 / 3)
  assert row.score == pytest.approx((4 + 2 + 3) / 3)
  assert server.auth_headers == {"Bearer sk-env"}
  assert (tmp_path / "eval" / "judge_cache.jsonl").exists()

  # Rerun: only the unjudged sample goes to the server again.
  server.attempts.clear()
  (rerun,) = evaluate.evaluate(config, tmp_path / "eval", answer_fn)
  assert server.attempts == {"500": 2}
  assert rerun == row


def test_video_chatgpt_protocol_asks_with_its_system_message_counts_yes(
    server, tmp_path):
  tags = ["dict:yes:5", "dict:no:1", "dict:yes:3", "noscore", "500"]
  rows = [{"id": f"q{i}", "video": f"v{i}",  # no caption, none needed
           "conversations": [
               {"from": "human", "value": f"<video>\n[{tag}] What is it?"},
               {"from": "gpt", "value": "This."}]}
          for i, tag in enumerate(tags)]
  path = tmp_path / "msvd.qa.official.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = defaults.get_config().eval
  config.update(test_sets=[str(path)], scoring="judge", protocol="video_chatgpt")
  config.judge.update(model="judge-test", base_url=server.url,
                      api_key="sk-test", max_retries=0)

  (row,) = evaluate.evaluate(config, tmp_path / "eval",
                             lambda batch: ["It is this one."] * len(batch))

  for body in server.bodies:
    system, user = body["messages"]
    assert system == {"role": "system",
                      "content": video_chatgpt_prompt.SYSTEM_PROMPT}
    assert user["role"] == "user" and user["content"].startswith(
        "Please evaluate the following video-based question-answer pair:\n")
    assert "\nCorrect Answer: This.\nPredicted Answer: It is this one.\n" in (
        user["content"])
  # "Explanation: I cannot tell." holds a "no" and no score, as published.
  assert (row.protocol, row.n, row.scored, row.parse_failures,
          row.unjudged) == ("video_chatgpt", 5, 3, 1, 1)
  assert row.accuracy == pytest.approx(2 / 4)
  assert row.score == pytest.approx((5 + 1 + 3) / 3)
  assert "| msvd.qa.official | video_chatgpt | 5 | 0 | 50.00 | 3.00 | 1 | 1 |" in (
      tmp_path / "eval" / "results.md").read_text()


def test_eval_exits_non_zero_on_a_closed_endpoint_and_on_unjudged_records(
    server, closed_url, tmp_path, load_config, capsys):
  config = load_config("smoke")
  config.eval.scoring = "judge"
  config.eval.judge.update(base_url=closed_url, api_key="sk-test",
                           model="judge-test", max_retries=0)
  with pytest.raises(SystemExit, match=re.escape(closed_url)):
    evaluate.main(config, str(tmp_path))
  assert not list(tmp_path.glob("*/predictions.jsonl"))  # nothing answered

  config.eval.judge.base_url = server.url  # answers every prompt with a 500
  with pytest.raises(SystemExit) as exit_:
    evaluate.main(config, str(tmp_path))
  (row,) = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  assert row["unjudged"] == row["n"] == sum(server.attempts.values()) > 0
  assert str(exit_.value.code).startswith(
      f"isr-dpo eval: {row['n']} of {row['n']} answered records are unjudged")
  assert "| Unjudged |" in capsys.readouterr().out
