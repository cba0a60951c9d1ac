"""The real thing: a vLLM server (CPU build, its own venv) serving smollm2-135m on 127.0.0.1, started with
``circuitexplain llm serve`` and stopped by the test. Explain -> simulate -> score for synthetic units whose
exemplars are tokenised by SmolLM2 itself; the server's process group is SIGKILLed in the middle of a run,
which must fail cleanly (one ``LLMUnavailableError``, the cache intact with the replies that arrived); after a
restart the run resumes from the cache and pays only for what was missing; a third run makes no request.

Then the same through the whole pipeline: ``circuitexplain explain`` explains (exemplar LLM, Bills prompt) and
simulates (prompt log-probs) three units of ``ioi-2l``'s circuit, discovered in the test with EAP, from exemplars of
an activation store built on the fly; the server is SIGKILLed once the first unit's line is written and the next
replies are cached, the command exits 1 with one line and keeps that line, and after a restart the rerun resumes:
finished units from the JSONL, the replies that arrived from the cache, only the rest from the server; a fresh run
on the same cache makes no request and writes the same explanations and scores.

This checks the pipeline, the parsing of real replies and prompt log-probs, the cache and the resume, not the
quality of a 135M model's prose. Never skipped under CI (``make test`` builds the vLLM venv)."""

from __future__ import annotations

import json
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
    graph = _ioi_circuit(tmp_path)
    try:
        _explain_simulate_score(base_url, vllm_env, tmp_path)
        state = _kill_midway_and_resume(base_url, vllm_env, tmp_path, port)
        state = _pipeline_kill_and_resume(base_url, vllm_env, tmp_path, port, graph)
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


def _ioi_circuit(tmp_path):
    """ioi-2l's circuit, discovered here (EAP, top 12 edges): the units the pipeline explains come from it."""
    from circuits.algorithms import DiscoveryConfig
    from circuits.discover import discover
    from graphs import circuit

    G = discover("ioi-2l", "ioi", "eap", DiscoveryConfig(topk=12, n_prompts=16))
    return circuit.save(G, tmp_path / "ioi-eap.json")


def _explain_cli(base_url, graph, out, cache, *extra):
    """``circuitexplain explain`` in a subprocess: 3 units, 3 shown and 3 held-out exemplars of 8 tokens each."""
    cmd = [sys.executable, "-m", "circuits.cli", "explain", "--model", "ioi-2l", "--graph", str(graph), "--level",
           "neuron", "--explainer", "exemplar-llm", "--scorer", "simulation", "--llm-base-url", base_url,
           "--llm-model", MODEL, "--llm-cache", str(cache), "--llm-concurrency", "1", "--llm-retries", "2",
           "--llm-timeout", "120", "--max-units", "3", "--per-node", "1", "--tokens", "2000", "--seq-len", "24",
           "--window", "8", "--explain-top", "3", "--held-out-top", "2", "--held-out-random", "1",
           "--held-out-per-quantile", "0", "--explain-max-tokens", "32", "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _jsonl(out):
    path = out / "explanations.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _pipeline_kill_and_resume(base_url, model_dir, tmp_path, port, graph):
    out, cache = tmp_path / "explain", tmp_path / "pipeline.sqlite"
    state = srv.read_state(port)
    proc = _explain_cli(base_url, graph, out, cache)
    # kill once the first unit is written (it runs alone: 1 explanation + 3 simulations) and the next two
    # replies (the other units' explanations) are cached
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and \
            not (_jsonl(out) and cache.exists() and cache_rows(cache) >= 6):
        time.sleep(0.1)
    assert _jsonl(out), f"no unit finished: {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() else ''}"
    os.killpg(state.pgid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("circuitexplain: error: LLM endpoint") and "failed after 3 tries: APIConnectionError" \
        in last and "rerun to resume" in last, last
    first = _jsonl(out)
    assert 1 <= len(first) < 3
    rows_before = cache_rows(cache)
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    deadline = time.monotonic() + 15
    while srv.group_members(state.pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not srv.group_members(state.pgid), "SIGKILL of the group left vLLM processes"

    state = srv.start_server(model_dir, name=MODEL, port=port, wait_s=400)
    proc = _explain_cli(base_url, graph, out, cache)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-2000:]
    lines = _jsonl(out)
    assert lines[:len(first)] == first and len({ln["unit"] for ln in lines}) == len(lines) == 3
    summary = json.loads((out / "summary.json").read_text())
    # every request of the resumed run got a reply that is now cached, and every reply cached before the kill that
    # the units left over needed came from the cache (the finished units' replies were not needed again)
    done_rows = sum(ln["explanation_meta"]["attempts"] + len(ln["exemplar_ids"]["held_out"]) for ln in first)
    assert summary["llm_requests"] == cache_rows(cache) - rows_before
    assert summary["llm_cache_hits"] == rows_before - done_rows >= 2
    for ln in lines:
        assert ln["explainer"] == f"llm:bills:{MODEL}" and ln["node"] and len(ln["exemplar_ids"]["explainer"]) == 3
        assert (ln["explanation"] or "").strip() or ln["explanation_failed"]
        assert not set(ln["exemplar_ids"]["explainer"]) & set(ln["exemplar_ids"]["held_out"])
        rec = ln["scorer_records"]["simulation"]
        if ln["explanation"] is None:
            assert rec["failed"] and ln["scores"]["simulation"] is None
            continue
        assert rec["failed"] is None and rec["meta"]["format"] == "sim-v1", rec  # all tokens at once (echo)
        assert rec["record_ids"] == ln["exemplar_ids"]["held_out"]
        assert rec["actual"] == [a for e in ln["exemplars"]["held_out"] for a in e["activations"]]
        assert all(0.0 <= p <= 9.0 for p in rec["predicted"])
        assert ln["scores"]["simulation"] == es.score_record(rec)

    proc = _explain_cli(base_url, graph, tmp_path / "fresh", cache, "--store", str(out / "store"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["llm_requests"] == 0
    fresh = {ln["unit"]: ln for ln in _jsonl(tmp_path / "fresh")}
    assert {u: (ln["explanation"], ln["scores"]) for u, ln in fresh.items()} == \
        {ln["unit"]: (ln["explanation"], ln["scores"]) for ln in lines}
    return state
