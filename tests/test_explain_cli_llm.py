"""``circuitexplain explain --explainer exemplar-llm`` against a local fake OpenAI-compatible endpoint (a stdlib
HTTP server that follows the prompts' formats: it names the highest-level token as the explanation and, as the
detection scorer, answers 1 for the texts that contain that word). The endpoint goes down in the middle of a run:
the command fails with one line (exit 1), keeps the units it finished, and a rerun resumes them from the JSONL
and the rest from the LLM cache, paying only for replies it never got; a fresh run on the same cache makes no
request and writes the same explanations and scores. The real thing (vLLM, SIGKILL) is in
tests/test_vllm_integration.py."""

from __future__ import annotations

import json
import re

from test_explain_cli import lines_of, run, small_circuit
from test_llm_fakeserver import FakeLLM, Scripted, chat_reply


def answer(body: dict) -> dict:
    user = body["messages"][-1]["content"]
    if "Text examples:" in user:  # detection-v1
        word = re.search(r"Feature explanation: the word (\S+)", user)[1]
        examples = re.findall(r"^Example \d+: (.*)$", user, re.M)
        return chat_reply("[" + ", ".join("1" if word in ex else "0" for ex in examples) + "]")
    levels = re.findall(r"^(.+)\t(\d+)$", user, re.M)  # bills-v1: token<TAB>level lines
    best = max(levels, key=lambda t: int(t[1]))[0].strip()
    return chat_reply(f"Explanation: the word {best}")


def test_llm_endpoint_down_midway_then_resume_from_the_cache(tmp_path, capsys):
    graph = small_circuit(tmp_path / "c.json")
    state = {"served": 0, "fail_after": 7}
    answered: list[str] = []

    def reply(path, body):
        if state["fail_after"] is not None and state["served"] >= state["fail_after"]:
            return Scripted(status=503, body='{"error": "down"}')
        state["served"] += 1
        answered.append(json.dumps(body["messages"], sort_keys=True))
        return answer(body)

    out, cache = tmp_path / "out", tmp_path / "llm.sqlite"
    with FakeLLM(reply=reply) as fake:
        argv = ["--model", "ioi-2l", "--graph", str(graph), "--level", "neuron", "--explainer", "exemplar-llm",
                "--scorer", "detection,embedding", "--llm-base-url", fake.base_url, "--llm-model", "fake",
                "--llm-cache", str(cache), "--llm-concurrency", "1", "--llm-retries", "1", "--max-units", "4",
                "--tokens", "3000", "--seq-len", "32", "--window", "10", "--explain-top", "4"]
        code, _, err = run(capsys, *argv, "--out", str(out))
        assert code == 1
        last = err.strip().splitlines()[-1]                          # the error: one line, last
        assert last.startswith("circuitexplain: error: LLM endpoint") and "failed after 2 tries" in last
        assert "rerun to resume" in last and f"units written to {out}" in last
        first = lines_of(out)
        assert 1 <= len(first) < 4                                   # explanations first, then scores unit by unit
        before = list(answered)
        state["fail_after"] = None
        code, stdout, err = run(capsys, *argv, "--out", str(out))
        assert code == 0, err
        lines = lines_of(out)
        assert lines[:len(first)] == first and len({ln["unit"] for ln in lines}) == len(lines) == 4
        again = answered[len(before):]
        assert not set(again) & set(before)                          # no reply paid for twice
        summary = json.loads((out / "summary.json").read_text())
        assert summary["llm_requests"] == len(again) and summary["llm_cache_hits"] >= 4 - len(first)
        for ln in lines:
            assert ln["explanation"].startswith("the word ")
            assert len(ln["exemplar_ids"]["explainer"]) == 4
            assert not set(ln["exemplar_ids"]["explainer"]) & set(ln["exemplar_ids"]["held_out"])
            rec = ln["scorer_records"]["detection"]
            assert rec["failed"] is None and sorted(rec["record_ids"]) == sorted(ln["exemplar_ids"]["held_out"])
        n = len(fake.requests)
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / "fresh"), "--store", str(out / "store"))
        assert code == 0, err
        assert len(fake.requests) == n                               # all from the cache
        fresh = {ln["unit"]: ln for ln in lines_of(tmp_path / "fresh")}
        for ln in lines:
            f = fresh[ln["unit"]]
            assert (f["explanation"], f["scores"], f["exemplar_ids"]) == (ln["explanation"], ln["scores"],
                                                                         ln["exemplar_ids"])
        assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["llm_requests"] == 0


def test_a_refused_explanation_prompt_is_a_recorded_failure_other_refusals_stop(tmp_path, capsys):
    """HTTP 400 for an explanation (a prompt longer than the server's context, typically) fails that unit with the
    reason; any other refusal (404: unknown model) stops the run with one line."""
    graph = small_circuit(tmp_path / "c.json")
    status = {"code": 400}

    def reply(path, body):
        if "Text examples:" not in body["messages"][-1]["content"]:
            return Scripted(status=status["code"], body='{"error": {"message": "too long"}}')
        return answer(body)

    with FakeLLM(reply=reply) as fake:
        argv = ["--model", "ioi-2l", "--graph", str(graph), "--level", "neuron", "--explainer", "exemplar-llm",
                "--scorer", "detection", "--llm-base-url", fake.base_url, "--llm-model", "fake", "--llm-cache",
                str(tmp_path / "c.sqlite"), "--max-units", "2", "--tokens", "1500", "--seq-len", "32"]
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / "a"))
        assert code == 0, err
        for ln in lines_of(tmp_path / "a"):
            assert ln["explanation"] is None and "refused the explanation prompt" in ln["explanation_failed"]
            assert ln["scores"]["detection"] is None and "no explanation" in ln["score_failures"]["detection"]
        assert json.loads((tmp_path / "a" / "summary.json").read_text())["failed_explanations"] == 2
        status["code"] = 404
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / "b"))
        assert code == 1 and err.strip().splitlines()[-1].startswith("circuitexplain: error:") and "404" in err
        assert not (tmp_path / "b" / "explanations.jsonl").exists()
