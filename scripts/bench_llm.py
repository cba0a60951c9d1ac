"""Benchmark the LLM client against a vLLM server: explanations + simulations of N synthetic units made one by
one (concurrency 1) and all at once (bounded concurrency), in one run, then a rerun on the warm cache.

Each unit costs one Bills-style explanation (chat, greedy, up to --max-tokens tokens) and one simulation of a
held-out record (completions with echo + prompt log-probs). The two timed phases make the same calls, each
with a fresh client cache and (unless --llm-base-url is given) a freshly started server, so neither phase
profits from vLLM's prefix cache of the other's prompts; within a phase the shared instruction prefix is
cached by vLLM as in any real run. Writes a table and JSON (default benchmarks/llm-throughput.json).

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
import sys
import tempfile
import time
from pathlib import Path

from explainers.llm import ActivationRecord, Explanation, LLMClient, LLMConfig, LLMExplainer
from explainers.llm import server as srv
from explainers.scoring.simulation import SimulationScorer

NAMES = ["Mary", "John", "Alice", "Bob", "Carol", "David", "Anna", "Tom"]
WORDS = ["the", "store", "went", "to", "gave", "a", "drink", "park", "and", "after", "house", "dog", "cat", "river",
         "quickly", "red", "book", "table", "sun", "rain", "city", "old", "new", "tree"]


def synthetic_units(n: int, seed: int) -> dict[str, tuple[list[ActivationRecord], ActivationRecord, str]]:
    """N units, each firing on its own random set of 3 words: 4 shown records, 1 held-out, the rule text."""
    rng = random.Random(seed)
    vocab = NAMES + WORDS
    units = {}
    for u in range(n):
        words = set(rng.sample(vocab, 3))
        recs = []
        for i in range(5):
            toks = [(" " if j else "") + rng.choice(vocab) for j in range(rng.randint(10, 16))]
            recs.append(ActivationRecord(tokens=toks, activations=[3.0 if t.strip() in words else 0.0 for t in toks],
                                         id=f"u{u}:r{i}"))
        units[f"u{u}"] = (recs[:4], recs[4], " or ".join(sorted(words)))
    return units


def phase(base_url: str, model: str, cache: Path, units: dict, concurrency: int, max_tokens: int) -> dict:
    client = LLMClient(LLMConfig(base_url=base_url, model=model, concurrency=concurrency), cache)
    explainer = LLMExplainer(client, style="bills", max_tokens=max_tokens)
    sim = SimulationScorer(client, mode="prompt-logprobs")
    calls = []
    for name, (shown, held, rule) in units.items():
        calls.append(explainer.aexplain(name, shown))
        calls.append(sim.ascore(Explanation(unit=name, text=f"the words {rule}", explainer="rule"), [held]))
    t0 = time.perf_counter()
    outs = client.run(calls, desc=f"concurrency {concurrency}")
    seconds = time.perf_counter() - t0
    client.close()
    return {"concurrency": concurrency, "calls": len(calls), "seconds": round(seconds, 3),
            "calls_per_s": round(len(calls) / seconds, 3), "requests": client.stats["requests"],
            "cache_hits": client.stats["cache_hits"], "failed": sum(1 for o in outs if getattr(o, "failed", None))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in the concurrent phase")
    p.add_argument("--max-tokens", type=int, default=32, help="explanation length limit (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-base-url", help="use this endpoint instead of starting smollm2-135m locally")
    p.add_argument("--llm-model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("benchmarks/llm-throughput.json"))
    args = p.parse_args(argv)
    units = synthetic_units(args.units, args.seed)

    @contextlib.contextmanager
    def serving():
        if args.llm_base_url:
            yield args.llm_base_url
            return
        from circuits.pretrained import ensure_model

        port = srv.free_port()
        print(f"starting vLLM ({args.llm_model}) on port {port} ...", file=sys.stderr)
        try:
            yield srv.start_server(ensure_model(args.llm_model), name=args.llm_model, port=port).base_url
        finally:
            srv.stop_server(port)

    with tempfile.TemporaryDirectory() as tmp:
        with serving() as url:
            seq = phase(url, args.llm_model, Path(tmp) / "seq.sqlite", units, 1, args.max_tokens)
        with serving() as url:
            con = phase(url, args.llm_model, Path(tmp) / "con.sqlite", units, args.concurrency, args.max_tokens)
            rerun = phase(url, args.llm_model, Path(tmp) / "con.sqlite", units, args.concurrency, args.max_tokens)
    result = {"model": args.llm_model, "units": args.units, "calls_per_unit": 2, "max_tokens": args.max_tokens,
              "sequential": seq, "concurrent": con, "rerun": rerun,
              "speedup": round(seq["seconds"] / con["seconds"], 2),
              "rerun_cache_hit_rate": rerun["cache_hits"] / rerun["calls"],
              "fresh_server_per_phase": not args.llm_base_url,
              "load_average_1min_at_end": round(os.getloadavg()[0], 2),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, vLLM CPU (bf16, --enforce-eager)"}
    print(f"{'phase':<12}{'conc.':>6}{'calls':>7}{'seconds':>10}{'calls/s':>9}{'requests':>10}{'hits':>6}")
    for name in ("sequential", "concurrent", "rerun"):
        r = result[name]
        print(f"{name:<12}{r['concurrency']:>6}{r['calls']:>7}{r['seconds']:>10.2f}{r['calls_per_s']:>9.2f}"
              f"{r['requests']:>10}{r['cache_hits']:>6}")
    print(f"speedup {result['speedup']}x; rerun cache hits {result['rerun_cache_hit_rate']:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
