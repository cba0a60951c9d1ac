"""LLM client: cache (a rerun makes zero requests; two processes share it), concurrency bound, retries on
429 (Retry-After) / 5xx / timeouts / refused connections, malformed and unparseable replies recorded as
failures with their reason. Error handling runs against a local fake endpoint (test_llm_fakeserver)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_llm_fakeserver import FakeLLM, Scripted, chat_reply

from explainers.llm import (
    ActivationRecord,
    LLMCache,
    LLMClient,
    LLMConfig,
    LLMExplainer,
    LLMRequestError,
    LLMUnavailableError,
)
from explainers.llm.client import chat_text
from explainers.llm.server import free_port
from explainers.scoring.simulation import SimulationScorer

RECORDS = [ActivationRecord(tokens=("When", " Mary", " and", " John"), activations=(0, 3.0, 0, 2.5), id="d0:0"),
           ActivationRecord(tokens=("The", " cat", " sat"), activations=(0, 0, 0), id="d1:0")]


def client(fake: FakeLLM | str, tmp_path: Path, **kw) -> LLMClient:
    url = fake if isinstance(fake, str) else fake.base_url
    cfg = dict(base_url=url, model="fake", backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0)
    cfg.update(kw)
    return LLMClient(LLMConfig(**cfg), tmp_path / "cache.sqlite")


def explain(c: LLMClient, units: dict) -> dict:
    return LLMExplainer(c).explain_many(units, progress=False)


def test_rerun_makes_zero_requests_and_counts_cache_hits(tmp_path):
    units = {f"u{i}": [ActivationRecord(tokens=("a", f" w{i}"), activations=(0, 1), id=f"r{i}")] for i in range(6)}
    with FakeLLM() as fake:
        c = client(fake, tmp_path)
        first = explain(c, units)
        assert len(fake.requests) == 6 and c.stats["requests"] == 6 and c.stats["cache_hits"] == 0
        c2 = client(fake, tmp_path)
        second = explain(c2, units)
        assert len(fake.requests) == 6, "a rerun must not call the endpoint"
        assert c2.stats["requests"] == 0 and c2.stats["cache_hits"] == 6
    assert {u: e.text for u, e in first.items()} == {u: e.text for u, e in second.items()}
    assert all(e.text == "names of people" and e.meta["cached"] for e in second.values())
    # the key holds the model, the messages, the parameters and the format version
    c3 = client(fake, tmp_path, model="other")
    assert c3.cache.get({"model": "fake", "kind": "chat", "format": "bills-v1"}) is None


def test_concurrency_is_bounded_by_the_semaphore(tmp_path):
    units = {f"u{i}": [ActivationRecord(tokens=("x", f" {i}"), activations=(0, 1), id=f"r{i}")] for i in range(12)}
    with FakeLLM(script=[Scripted(delay=0.5) for _ in range(12)]) as fake:
        t0 = time.monotonic()
        explain(client(fake, tmp_path, concurrency=4), units)
        elapsed = time.monotonic() - t0
    assert fake.max_in_flight == 4
    assert elapsed >= 3 * 0.5 * 0.9  # 12 requests, 4 at a time, 0.5 s each


def test_429_waits_for_retry_after(tmp_path):
    with FakeLLM(script=[Scripted(status=429, body='{"error": {"message": "slow down"}}',
                                  headers={"retry-after": "1"})]) as fake:
        c = client(fake, tmp_path)
        t0 = time.monotonic()
        e = LLMExplainer(c).explain("u", RECORDS)
        elapsed = time.monotonic() - t0
    assert e.text == "names of people"
    assert len(fake.requests) == 2 and c.stats["retries"] == 1
    assert elapsed >= 0.95, f"Retry-After: 1 must be honoured (backoff alone is 0.01 s), waited {elapsed:.2f} s"


def test_5xx_is_retried_then_succeeds(tmp_path):
    with FakeLLM(script=[Scripted(status=500, body='{"error": "x"}'), Scripted(status=503, body='{"error": "y"}')]
                 ) as fake:
        c = client(fake, tmp_path)
        e = LLMExplainer(c).explain("u", RECORDS)
    assert e.text == "names of people" and len(fake.requests) == 3 and c.stats["retries"] == 2


def test_persistent_5xx_raises_unavailable_and_caches_nothing(tmp_path):
    with FakeLLM(script=[Scripted(status=502, body="{}") for _ in range(10)]) as fake:
        c = client(fake, tmp_path, max_retries=3)
        with pytest.raises(LLMUnavailableError, match=r"failed after 4 tries: HTTP 502"):
            LLMExplainer(c).explain("u", RECORDS)
    assert len(fake.requests) == 4 and len(c.cache) == 0


def test_timeouts_are_retried(tmp_path):
    with FakeLLM(script=[Scripted(delay=1.5)]) as fake:
        c = client(fake, tmp_path, timeout_s=0.5)
        e = LLMExplainer(c).explain("u", RECORDS)
    assert e.text == "names of people" and c.stats["retries"] == 1 and len(fake.requests) == 2


def test_refused_connection_fails_cleanly(tmp_path):
    c = client(f"http://127.0.0.1:{free_port()}/v1", tmp_path, max_retries=2)
    with pytest.raises(LLMUnavailableError, match=r"failed after 3 tries: APIConnectionError"):
        LLMExplainer(c).explain("u", RECORDS)
    assert c.stats["requests"] == 3 and len(c.cache) == 0


def test_4xx_is_not_retried(tmp_path):
    with FakeLLM(script=[Scripted(status=404, body='{"error": {"message": "model x does not exist"}}')]) as fake:
        c = client(fake, tmp_path)
        with pytest.raises(LLMRequestError, match="HTTP 404"):
            LLMExplainer(c).explain("u", RECORDS)
    assert len(fake.requests) == 1


def test_malformed_json_is_retried_then_parsed(tmp_path):
    with FakeLLM(script=[Scripted(body="this is {not json")]) as fake:
        c = client(fake, tmp_path)
        e = LLMExplainer(c).explain("u", RECORDS)
    assert e.text == "names of people" and e.meta["attempts"] == 2 and len(fake.requests) == 2


def test_always_malformed_is_a_failure_with_its_reason(tmp_path):
    with FakeLLM(script=[Scripted(body="<html>oops</html>") for _ in range(3)]) as fake:
        e = LLMExplainer(client(fake, tmp_path)).explain("u", RECORDS)
    assert e.text is None and e.failed.startswith("malformed reply") and len(fake.requests) == 3


def test_unparseable_reply_is_retried_with_new_parameters_then_recorded_failed(tmp_path):
    with FakeLLM(reply=lambda path, body: chat_reply("   ")) as fake:
        c = client(fake, tmp_path, parse_retries=2)
        e = LLMExplainer(c).explain("u", RECORDS)
        assert e.text is None and e.failed == "empty reply" and e.meta["attempts"] == 3
        assert [(r["temperature"], r.get("seed")) for r in fake.requests] == [(0.0, None), (0.7, 1), (0.7, 2)]
        # the failed attempts are cached replies: a rerun replays them and pays nothing
        c2 = client(fake, tmp_path, parse_retries=2)
        e2 = LLMExplainer(c2).explain("u", RECORDS)
    assert e2.failed == "empty reply" and len(fake.requests) == 3 and c2.stats["cache_hits"] == 3
    d = e2.to_dict()
    assert d["text"] is None and d["failed"] == "empty reply"


def test_second_attempt_that_parses_wins(tmp_path):
    replies = iter(["", "Explanation: the word and"])
    with FakeLLM(reply=lambda path, body: chat_reply(next(replies))) as fake:
        e = LLMExplainer(client(fake, tmp_path)).explain("u", RECORDS)
    assert e.text == "the word and" and e.meta["attempts"] == 2 and len(fake.requests) == 2


def test_simulation_falls_back_to_one_token_at_a_time(tmp_path):
    """An endpoint that refuses echo (400 on /completions): the auto simulator asks per token, reading the
    expected level from the first reply token's top log-probs."""
    import math

    from explainers.llm.records import Explanation

    def reply(path, body):
        if path.endswith("/completions") and "chat" not in path:
            return Scripted(status=400, body='{"error": {"message": "echo unsupported"}}')
        text = body["messages"][1]["content"]
        lp = {"9": math.log(0.5), "7": math.log(0.5)} if "<< Mary>>" in text else {"0": 0.0}
        return chat_reply("9", top_logprobs=lp)

    with FakeLLM(reply=reply) as fake:
        c = client(fake, tmp_path)
        out = SimulationScorer(c).score(Explanation(unit="u", text="names", explainer="x"), RECORDS)
    assert out.meta["mode"] == "per-token" and out.failed is None
    assert out.predicted == (0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    chats = [r for r in fake.requests if "messages" in r]
    assert len(chats) == 7 and all(r["top_logprobs"] == 20 and r["max_tokens"] == 1 for r in chats)


_WRITER = """
import sys
from explainers.llm import LLMClient, LLMConfig
from explainers.llm.client import chat_text
c = LLMClient(LLMConfig(base_url=sys.argv[1], model="fake", backoff_s=0.01), sys.argv[2])
calls = [c.chat([{"role": "user", "content": f"q{i}"}], fmt="t-v1", parse=chat_text) for i in range(int(sys.argv[3]), 60)]
c.run(calls, progress=False)
print(c.stats["requests"], c.stats["cache_hits"])
"""


def test_two_processes_share_the_cache_without_corrupting_it(tmp_path):
    """Two processes write overlapping calls into one cache at once (WAL); afterwards every reply is there
    once, the database checks out, and a third run is served entirely from it."""
    path = tmp_path / "shared.sqlite"
    with FakeLLM(reply=lambda p, b: chat_reply(b["messages"][0]["content"].upper())) as fake:
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, fake.base_url, str(path), start],
                                  stdout=subprocess.PIPE, text=True) for start in ("0", "20")]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 60
        c = LLMClient(LLMConfig(base_url=fake.base_url, model="fake"), path)
        before = len(fake.requests)
        got = c.run([c.chat([{"role": "user", "content": f"q{i}"}], fmt="t-v1", parse=chat_text) for i in range(60)],
                    progress=False)
        assert len(fake.requests) == before and c.stats["cache_hits"] == 60
    assert [r.value for r in got] == [f"Q{i}" for i in range(60)]


def test_cache_is_written_as_replies_arrive(tmp_path):
    """Replies that arrived before the endpoint died stay cached: the resumed run pays only for the rest."""
    script = [Scripted() for _ in range(3)] + [Scripted(status=500, body="{}") for _ in range(20)]
    units = {f"u{i}": [ActivationRecord(tokens=("a", f" {i}"), activations=(0, 1), id=f"r{i}")] for i in range(6)}
    with FakeLLM(script=script) as fake:
        c = client(fake, tmp_path, concurrency=1, max_retries=1)
        with pytest.raises(LLMUnavailableError):
            explain(c, units)
        assert len(LLMCache(tmp_path / "cache.sqlite")) == 3
        fake.script.clear()
        c2 = client(fake, tmp_path)
        done = explain(c2, units)
    assert c2.stats["cache_hits"] == 3 and c2.stats["requests"] == 3
    assert all(e.text == "names of people" for e in done.values())


def test_config_errors_are_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="no LLM endpoint"):
        LLMClient(LLMConfig(model="m"), tmp_path / "c.sqlite")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1/")
    c = LLMClient(LLMConfig(model="m"), tmp_path / "c.sqlite")
    assert c.config.base_url == "http://127.0.0.1:1/v1" and c.config.api_key
    with pytest.raises(ValueError, match="no LLM model"):
        LLMClient(LLMConfig(), tmp_path / "c.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        LLMCache(bad)
    assert chat_text(json.loads(json.dumps(chat_reply("hi")))) == "hi"


def test_retry_after_forms():
    from explainers.llm.client import _retry_after

    class Err:
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert _retry_after(Err({"retry-after": "2"})) == 2.0
    assert _retry_after(Err({"retry-after-ms": "1500"})) == 1.5
    assert _retry_after(Err({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # a date in the past
    assert _retry_after(Err({"retry-after": "soon"})) is None
    assert _retry_after(Err({})) is None
