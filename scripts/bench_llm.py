"""Benchmark the LLM client against a vLLM server: explanations + simulations of N synthetic units made one by
one (concurrency 1) and all at once (bounded concurrency), in one run, then a rerun on the warm cache.

Each unit costs one Bills-style explanation (chat, greedy, up to --max-tokens tokens) and one simulation of a
held-out record (completions with echo + prompt log-probs). The two timed phases make the same calls, each
with a fresh client cache and (unless --llm-base-url is given) a freshly started server, so neither phase
profits from vLLM's prefix cache of the other's prompts; within a phase the shared instruction prefix is
cached by vLLM as in any real run. Writes a table and JSON (default benchmarks/llm-throughput.json).

Knobs a researcher would try (recorded in the JSON): ``--server-args`` passed to vLLM (e.g. ``--block-size 32``:
the CPU backend's default KV block of 128 tokens caches a shared prefix only in whole blocks), ``--threads``
(unbound OpenMP threads, for a machine shared with other busy processes), ``--prime`` (the concurrent phase first
sends one explanation and one simulation alone, so the shared instruction prefixes are in vLLM's prefix cache
before the other 63 units arrive; the sequential phase gets this for free from its first unit; timed in the
phase), and ``--record-tokens`` (the length of the synthetic exemplars, i.e. the prompt size). The server's
Prometheus counters (prompt and generated tokens, prefix-cache queries and hits) are read around each phase.

  .venv/bin/python scripts/bench_llm.py                       # starts smollm2-135m on a free port, stops it
  .venv/bin/python scripts/bench_llm.py --llm-base-url http://127.0.0.1:8000/v1 --llm-model smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from explainers.llm import ActivationRecord, Explanation, LLMClient, LLMConfig, LLMExplainer
from explainers.llm import server as srv
from explainers.scoring.simulation import SimulationScorer

NAMES = ["Mary", "John", "Alice", "Bob", "Carol", "David", "Anna", "Tom"]
WORDS = ["the", "store", "went", "to", "gave", "a", "drink", "park", "and", "after", "house", "dog", "cat", "river",
         "quickly", "red", "book", "table", "sun", "rain", "city", "old", "new", "tree"]


def synthetic_units(n: int, seed: int, lengths: tuple[int, int] = (10, 16)
                    ) -> dict[str, tuple[list[ActivationRecord], ActivationRecord, str]]:
    """N units, each firing on its own random set of 3 words: 4 shown records, 1 held-out, the rule text;
    records of ``lengths[0]..lengths[1]`` tokens."""
    rng = random.Random(seed)
    vocab = NAMES + WORDS
    units = {}
    for u in range(n):
        words = set(rng.sample(vocab, 3))
        recs = []
        for i in range(5):
            toks = [(" " if j else "") + rng.choice(vocab) for j in range(rng.randint(*lengths))]
            recs.append(ActivationRecord(tokens=toks, activations=[3.0 if t.strip() in words else 0.0 for t in toks],
                                         id=f"u{u}:r{i}"))
        units[f"u{u}"] = (recs[:4], recs[4], " or ".join(sorted(words)))
    return units


METRICS = {"prompt_tokens": "vllm:prompt_tokens_total", "generation_tokens": "vllm:generation_tokens_total",
           "prompt_tokens_cached": "vllm:prompt_tokens_cached_total",
           "prefix_cache_queries": "vllm:prefix_cache_queries_total", "prefix_cache_hits": "vllm:prefix_cache_hits_total",
           # per-request histograms' sums (seconds): in the one-by-one phase they add up to the engine's busy time
           # split into prefill and decode; in the concurrent phase requests overlap, so they exceed the wall time
           "prefill_seconds_sum": "vllm:request_prefill_time_seconds_sum",
           "decode_seconds_sum": "vllm:request_decode_time_seconds_sum",
           "queue_seconds_sum": "vllm:request_queue_time_seconds_sum",
           "e2e_seconds_sum": "vllm:e2e_request_latency_seconds_sum"}


class LoadSampler:
    """The 1-minute load average (as `uptime` prints it) every ``every_s`` seconds while a phase runs."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        xs = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(xs) / len(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
                "samples": len(xs)}


def uptime() -> str:
    """`uptime`'s line (load averages over 1, 5 and 15 minutes)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def server_counters(base_url: str) -> dict[str, float]:
    """vLLM's Prometheus counters (summed over label sets); empty when the endpoint has no /metrics."""
    try:
        with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for key, name in METRICS.items():
        vals = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        if vals:
            out[key] = sum(float(v) for v in vals)
    return out


def phase(base_url: str, model: str, cache: Path, units: dict, concurrency: int, max_tokens: int,
          prime: bool = False) -> dict:
    client = LLMClient(LLMConfig(base_url=base_url, model=model, concurrency=concurrency), cache)
    explainer = LLMExplainer(client, style="bills", max_tokens=max_tokens)
    sim = SimulationScorer(client, mode="prompt-logprobs")

    def calls_of(names):
        calls = []
        for name in names:
            shown, held, rule = units[name]
            calls.append(explainer.aexplain(name, shown))
            calls.append(sim.ascore(Explanation(unit=name, text=f"the words {rule}", explainer="rule"), [held]))
        return calls

    names = list(units)
    before = server_counters(base_url)
    t0 = time.perf_counter()
    outs = []
    with LoadSampler() as load:
        if prime and len(names) > 1:  # one unit alone first: the shared prefixes enter vLLM's prefix cache
            outs += client.run(calls_of(names[:1]), desc="prime", progress=False)
            names = names[1:]
        outs += client.run(calls_of(names), desc=f"concurrency {concurrency}")
    seconds = time.perf_counter() - t0
    after = server_counters(base_url)
    client.close()
    counters = {k: after[k] - before.get(k, 0.0) for k in after}
    if counters.get("prefix_cache_queries"):
        counters["prefix_cache_hit_rate"] = round(counters["prefix_cache_hits"] / counters["prefix_cache_queries"], 3)
    if counters.get("prompt_tokens"):
        counters["prompt_tokens_per_s"] = round(counters["prompt_tokens"] / seconds, 1)
        computed = counters["prompt_tokens"] - counters.get("prompt_tokens_cached", 0.0)
        counters["prompt_tokens_computed"] = computed
        if counters.get("prefill_seconds_sum") and concurrency == 1:  # one at a time: sums are busy time
            counters["prefill_tokens_per_s_alone"] = round(computed / counters["prefill_seconds_sum"], 1)
    if concurrency == 1 and counters.get("prefill_seconds_sum") is not None:
        # one request at a time: wall time = prefill + decode (+ queue) inside the engine + everything outside it
        # (HTTP, tokenising, the API process building replies: the echoed prompt log-probs, the client)
        engine = sum(counters.get(k, 0.0) for k in ("prefill_seconds_sum", "decode_seconds_sum", "queue_seconds_sum"))
        counters["outside_engine_seconds"] = round(seconds - engine, 3)
        if counters.get("generation_tokens") and counters.get("decode_seconds_sum"):
            steps = counters["generation_tokens"] - len(outs)  # each request's first token comes with its prefill
            counters["decode_ms_per_token_alone"] = round(1000 * counters["decode_seconds_sum"] / max(steps, 1), 2)
    return {"concurrency": concurrency, "calls": 2 * len(units), "seconds": round(seconds, 3),
            "calls_per_s": round(2 * len(units) / seconds, 3), "requests": client.stats["requests"],
            "cache_hits": client.stats["cache_hits"], "failed": sum(1 for o in outs if getattr(o, "failed", None)),
            "primed": bool(prime), "load_average_1min": load.summary(), "server": counters}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in the concurrent phase")
    p.add_argument("--max-tokens", type=int, default=32, help="explanation length limit (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-base-url", help="use this endpoint instead of starting smollm2-135m locally")
    p.add_argument("--llm-model", default="smollm2-135m")
    p.add_argument("--server-args", default="", help="extra vLLM arguments, e.g. '--block-size 32'")
    p.add_argument("--dtype", default="bfloat16", help="vLLM weights' dtype (default bfloat16)")
    p.add_argument("--threads", type=int, help="vLLM CPU threads, unbound (default: one bound per core)")
    p.add_argument("--prime", action="store_true", help="concurrent phase: one unit alone first (see above)")
    p.add_argument("--record-tokens", default="10,16", help="synthetic record length range (default 10,16)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/llm-throughput.json"))
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.record_tokens.split(","))
    units = synthetic_units(args.units, args.seed, (lo, hi))
    extra = shlex.split(args.server_args)

    @contextlib.contextmanager
    def serving():
        if args.llm_base_url:
            yield args.llm_base_url
            return
        from circuits.pretrained import ensure_model

        port = srv.free_port()
        print(f"starting vLLM ({args.llm_model}) on port {port} ...", file=sys.stderr)
        try:
            yield srv.start_server(ensure_model(args.llm_model), name=args.llm_model, port=port,
                                   threads=args.threads, dtype=args.dtype, extra_args=extra).base_url
        finally:
            srv.stop_server(port)

    load_start, uptime_start = round(os.getloadavg()[0], 2), uptime()
    with tempfile.TemporaryDirectory() as tmp:
        with serving() as url:
            seq = phase(url, args.llm_model, Path(tmp) / "seq.sqlite", units, 1, args.max_tokens)
        with serving() as url:
            con = phase(url, args.llm_model, Path(tmp) / "con.sqlite", units, args.concurrency, args.max_tokens,
                        prime=args.prime)
            rerun = phase(url, args.llm_model, Path(tmp) / "con.sqlite", units, args.concurrency, args.max_tokens)
    result = {"model": args.llm_model, "units": args.units, "calls_per_unit": 2, "max_tokens": args.max_tokens,
              "sequential": seq, "concurrent": con, "rerun": rerun,
              "speedup": round(seq["seconds"] / con["seconds"], 2),
              "rerun_cache_hit_rate": rerun["cache_hits"] / rerun["calls"],
              "fresh_server_per_phase": not args.llm_base_url, "server_args": args.server_args,
              "threads": args.threads, "record_tokens": [lo, hi],
              "dtype": args.dtype, "load_average_1min_at_start": load_start,
              "load_average_1min_at_end": round(os.getloadavg()[0], 2),
              "uptime_at_start": uptime_start, "uptime_at_end": uptime(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, vLLM CPU ({args.dtype}, --enforce-eager)"}
    print(f"{'phase':<12}{'conc.':>6}{'calls':>7}{'seconds':>10}{'calls/s':>9}{'requests':>10}{'hits':>6}")
    for name in ("sequential", "concurrent", "rerun"):
        r = result[name]
        print(f"{name:<12}{r['concurrency']:>6}{r['calls']:>7}{r['seconds']:>10.2f}{r['calls_per_s']:>9.2f}"
              f"{r['requests']:>10}{r['cache_hits']:>6}")
    for name in ("sequential", "concurrent"):
        c = result[name]["server"]
        if c:
            print(f"{name}: {c.get('prompt_tokens', 0):.0f} prompt tokens ({c.get('prompt_tokens_computed', 0):.0f} "
                  f"computed, {c.get('prompt_tokens_per_s', 0)}/s), {c.get('generation_tokens', 0):.0f} generated, "
                  f"prefix-cache hit rate {c.get('prefix_cache_hit_rate')}; load {result[name]['load_average_1min']}")
    c = result["sequential"]["server"]
    if c.get("prefill_seconds_sum") is not None:
        print(f"one by one: prefill {c['prefill_seconds_sum']:.1f} s ({c.get('prefill_tokens_per_s_alone')} tokens/s), "
              f"decode {c.get('decode_seconds_sum', 0):.1f} s ({c.get('decode_ms_per_token_alone')} ms/token), "
              f"queue {c.get('queue_seconds_sum', 0):.1f} s, outside the engine {c['outside_engine_seconds']:.1f} s "
              f"of {result['sequential']['seconds']:.1f} s")
    print(f"speedup {result['speedup']}x; rerun cache hits {result['rerun_cache_hit_rate']:.0%}; load average "
          f"{load_start} -> {result['load_average_1min_at_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
