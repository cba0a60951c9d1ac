"""A local fake OpenAI-compatible HTTP server (stdlib ``http.server`` in a thread) for the client's error
handling only: scripted 429 / 500 / 400 replies, malformed bodies, slow replies. Real replies are tested
against a real vLLM server (tests/test_vllm_integration.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    """One scripted reply: HTTP ``status``, ``headers``, raw ``body`` (None: a valid reply from the server's
    ``reply`` function) and ``delay`` seconds before answering."""

    status: int = 200
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def chat_reply(text: str, model: str = "fake", top_logprobs: dict[str, float] | None = None) -> dict[str, Any]:
    logprobs = None
    if top_logprobs is not None:
        first = max(top_logprobs, key=top_logprobs.get)
        logprobs = {"content": [{"token": first, "logprob": top_logprobs[first], "bytes": None,
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                  for t, lp in top_logprobs.items()]}]}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeLLM:
    """``with FakeLLM(reply=fn) as fake:`` serves ``fake.base_url``; ``fake.script`` is a list of
    :class:`Scripted` consumed one per request (then ``reply(path, body)`` answers: a reply dict, or a :class:`Scripted` error); ``fake.requests``
    holds every request body; ``fake.max_in_flight`` the most requests handled at once."""

    def __init__(self, reply: Callable[[str, dict], dict] | None = None, script: list[Scripted] | None = None):
        self.reply = reply or (lambda path, body: chat_reply("Explanation: names of people"))
        self.script = list(script or [])
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append(body)
                    step = fake.script.pop(0) if fake.script else Scripted()
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(step.delay)
                    if step.body is None:
                        answer = fake.reply(self.path, body)
                        if isinstance(answer, Scripted):  # the reply function may answer with an error
                            step, answer = answer, answer.body
                        payload = answer if isinstance(answer, str) else json.dumps(answer)
                    else:
                        payload = step.body
                    data = payload.encode()
                    self.send_response(step.status)
                    self.send_header("content-type", "application/json")
                    for k, v in step.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_fake_server_answers_and_follows_its_script():
    import urllib.error
    import urllib.request

    with FakeLLM(script=[Scripted(status=500, body='{"error": "boom"}')]) as fake:
        req = urllib.request.Request(fake.base_url + "/chat/completions", data=b'{"model": "m"}',
                                     headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("a scripted 500 must fail")
        except urllib.error.HTTPError as e:
            assert e.code == 500
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == "Explanation: names of people"
    assert [r["model"] for r in fake.requests] == ["m", "m"]
