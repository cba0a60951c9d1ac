"""The real thing: a vLLM server (CPU build, its own venv) serving smollm2-135m on 127.0.0.1, started with
``circuitexplain llm serve`` and stopped by the test. Explain -> simulate -> score for synthetic units whose
exemplars are tokenised by SmolLM2 itself; the server's process group is SIGKILLed in the middle of a run,
which must fail cleanly (one ``LLMUnavailableError``, the cache intact with the replies that arrived); after a
restart the run resumes from the cache and pays only for what was missing; a third run makes no request.

This checks the pipeline, the parsing of real replies and prompt log-probs, the cache and the resume, not the
quality of a 135M model's prose. Never skipped under CI (``make test`` builds the vLLM venv)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from evals import explanation_scores as es
from explainers.llm import ActivationRecord, LLMClient, LLMConfig, LLMExplainer, LLMUnavailableError
from explainers.llm import server as srv
from explainers.scoring.simulation import SimulationScorer

MODEL = "smollm2-135m"
SENTENCES = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The cat sat on the mat while the dog slept by the door.",
    "Alice met Bob and Carol at the park on a sunny Sunday.",
    "A horse and a cow stood in the field near the old barn.",
    "Tom wrote a letter to Anna before he left for Paris.",
    "The bird flew over the house, and the sheep watched it go.",
    "After lunch, Sarah and David walked their dog to the river.",
    "The fox chased the rabbit into the forest at dawn.",
]
UNITS = {"names": {"mary", "john", "alice", "bob", "carol", "tom", "anna", "sarah", "david"},
         "animals": {"cat", "dog", "horse", "cow", "bird", "sheep", "fox", "rabbit"},
         "punctuation": {",", "."}}


@pytest.fixture(scope="module")
def vllm_env():
    """The vLLM venv and the converted model: skip locally without the venv, fail under CI (which builds it)."""
    try:
        srv.vllm_python()
    except ValueError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {e}")
        pytest.skip(str(e))
    from circuits.pretrained import ensure_model

    return ensure_model(MODEL, progress=False)


def records(model_dir) -> dict[str, list[ActivationRecord]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for unit, words in UNITS.items():
        recs = []
        for i, s in enumerate(SENTENCES):
            toks = [tok.decode([t]) for t in tok(s)["input_ids"]]
            acts = [4.0 if t.strip().lower() in words else 0.0 for t in toks]
            recs.append(ActivationRecord(tokens=toks, activations=acts, id=f"s{i}"))
        out[unit] = recs
    return out


def cache_rows(path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])
    finally:
        db.close()


def test_vllm_explain_simulate_score_kill_and_resume(vllm_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path / "ce-cache"))  # server state files of this test
    port = srv.free_port()
    ce = [sys.executable, "-m", "circuits.cli", "llm", "serve", "--port", str(port)]
    started = subprocess.run(ce + ["--model", str(vllm_env), "--name", MODEL, "--timeout", "400"],
                             capture_output=True, text=True, timeout=500)
    assert started.returncode == 0, started.stderr[-2000:]
    base_url = started.stdout.strip().splitlines()[-1]
    assert base_url == f"http://127.0.0.1:{port}/v1"
    state = srv.read_state(port)
    assert state is not None and srv.group_members(state.pgid)
    try:
        _explain_simulate_score(base_url, vllm_env, tmp_path)
        state = _kill_midway_and_resume(base_url, vllm_env, tmp_path, port)
    finally:
        stopped = subprocess.run(ce + ["--stop"], capture_output=True, text=True, timeout=120)
        srv.stop_server(port)  # whatever is left if the CLI failed
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not srv.group_members(state.pgid), "vLLM processes survived --stop"
    assert srv.read_state(port) is None


def _explain_simulate_score(base_url, model_dir, tmp_path):
    recs = records(model_dir)
    client = LLMClient(LLMConfig(base_url=base_url, model=MODEL, concurrency=8), tmp_path / "llm.sqlite")
    explainer = LLMExplainer(client, style="bills", max_tokens=48)
    shown = {u: r[:4] for u, r in recs.items()}
    held = {u: r[4:] for u, r in recs.items()}
    expls = explainer.explain_many(shown, progress=False)
    for unit, e in expls.items():
        assert e.exemplar_ids == ("s0", "s1", "s2", "s3")
        # a 135M model: either a parsed one-line explanation or a failure with its reason, never empty
        assert (e.text is not None and e.text.strip() and len(e.text.split()) <= 40) or e.failed, (unit, e)
    sim = SimulationScorer(client, mode="prompt-logprobs")
    units = [u for u, e in expls.items() if e.ok]
    outs = client.run([sim.ascore(expls[u], held[u]) for u in units], progress=False)
    for unit, out in zip(units, outs, strict=True):
        assert out.failed is None, out.failed
        assert out.meta["mode"] == "prompt-logprobs" and not out.meta["failed_records"]
        assert list(out.lengths) == [len(r.tokens) for r in held[unit]]
        assert all(0.0 <= p <= 9.0 for p in out.predicted)
        # real log-probs: most positions carry some mass on the digits (the worked example teaches the format)
        assert out.meta["positions_without_level"] < 0.5 * len(out.predicted)
        assert len(set(out.predicted)) > 1
        score = es.score_record(out.to_dict())
        assert score is None or -1.0 <= score <= 1.0
    requests = client.stats["requests"]
    again = LLMClient(LLMConfig(base_url=base_url, model=MODEL), tmp_path / "llm.sqlite")
    LLMExplainer(again, style="bills", max_tokens=48).explain_many(shown, progress=False)
    again.run([SimulationScorer(again, mode="prompt-logprobs").ascore(expls[u], held[u]) for u in units],
              progress=False)
    assert again.stats["requests"] == 0 and again.stats["cache_hits"] >= requests


def _kill_midway_and_resume(base_url, model_dir, tmp_path, port):
    """SIGKILL the server's whole process group after a few replies of a 24-call run have been cached."""
    recs = records(model_dir)
    calls_spec = [(u, i) for u in UNITS for i in range(len(SENTENCES))]
    cache = tmp_path / "kill.sqlite"
    texts = {"names": "names of people", "animals": "animals", "punctuation": "commas and full stops"}

    def make_calls(client):
        from explainers.llm.records import Explanation

        sim = SimulationScorer(client, mode="prompt-logprobs")
        return [sim.ascore(Explanation(unit=u, text=texts[u], explainer="given"), [recs[u][i]]) for u, i in calls_spec]

    state = srv.read_state(port)
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if cache.exists() and cache_rows(cache) >= 4:
                os.killpg(state.pgid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    client = LLMClient(LLMConfig(base_url=base_url, model=MODEL, concurrency=1, max_retries=3, backoff_s=0.2,
                                 timeout_s=60), cache)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailableError, match=r"failed after 4 tries: APIConnectionError.*rerun to resume"):
        client.run(make_calls(client), progress=False)
    thread.join(timeout=5)
    assert killed.is_set() and time.monotonic() - t0 < 200
    done = cache_rows(cache)
    assert 4 <= done < len(calls_spec)
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    deadline = time.monotonic() + 15
    while srv.group_members(state.pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not srv.group_members(state.pgid), "SIGKILL of the group left vLLM processes"

    # restart on the same port (the stale state file is replaced) and resume
    state = srv.start_server(model_dir, name=MODEL, port=port, wait_s=400)
    resumed = LLMClient(LLMConfig(base_url=base_url, model=MODEL, concurrency=8), cache)
    outs = resumed.run(make_calls(resumed), progress=False)
    assert resumed.stats["cache_hits"] == done and resumed.stats["requests"] == len(calls_spec) - done
    assert all(o.failed is None for o in outs)
    scores = {u: es.pearson([p for o, (uu, _) in zip(outs, calls_spec, strict=True) if uu == u for p in o.predicted],
                            [a for o, (uu, _) in zip(outs, calls_spec, strict=True) if uu == u for a in o.actual])
              for u in UNITS}
    assert all(s is None or -1 <= s <= 1 for s in scores.values())
    third = LLMClient(LLMConfig(base_url=base_url, model=MODEL), cache)
    third.run(make_calls(third), progress=False)
    assert third.stats["requests"] == 0 and third.stats["cache_hits"] == len(calls_spec)
    assert re.match(r"http://127\.0\.0\.1:\d+/v1", base_url)
    return state
