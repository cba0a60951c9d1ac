"""Baselines for the scores of `circuitexplain explain` runs: every unit's held-out exemplars scored again with
*another* unit's explanation (a seeded derangement within the run), by the same scorers, against the same endpoint.

An explanation that says something specific about its unit should score higher on that unit's held-out exemplars
than an explanation of some other unit of the same circuit does (Bills et al. 2023 compare against random
explanations the same way). The shuffled score is what a scorer gives an explanation that is unrelated to the unit
but written in the same style, so it is the floor a reader should hold a score against; for detection and fuzzing
chance is 0.5, for simulation and the token scorer 0, for the embedding AUC 0.5 -- the shuffled column measures
where each scorer actually sits for this run's exemplars and explainer.

Reads each run's ``explanations.jsonl`` (the held-out exemplars are saved in it: no model is loaded), writes one
JSON with, per run and scorer, the mean real score, the mean shuffled score, the number of units where the real
explanation beats the shuffled one, and the per-unit values. LLM replies go through the same SQLite cache as the
runs (a rerun makes no request).

  .venv/bin/python scripts/explain_baselines.py docs/results/explain/neuron-exemplar-llm \\
      docs/results/explain/neuron-vocab --scorers simulation,detection,fuzzing,embedding \\
      --llm-base-url http://127.0.0.1:8000/v1 --llm-model smollm2-135m --out docs/results/explain/baselines.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from evals.explanation_scores import score_record
from explainers.exemplars import UnitExemplars
from explainers.llm import Explanation
from explainers.scoring import build_scorer


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (``n >= 2``): unit ``i`` gets explanation
    ``perm[i]``."""
    if n < 2:
        raise ValueError(f"a shuffled baseline needs at least 2 explained units, got {n}")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def load_run(run: Path) -> list[dict[str, Any]]:
    path = run / "explanations.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no explanations.jsonl")
    lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return [ln for ln in lines if ln.get("explanation") is not None]


def shuffled_scores(lines: list[dict[str, Any]], scorers: dict[str, Any], client: Any, seed: int
                    ) -> dict[str, list[float | None]]:
    """Per scorer, per unit (in ``lines`` order): the score of another unit's explanation on this unit's
    held-out exemplars."""
    perm = derangement(len(lines), seed)
    calls, keys = [], []
    for i, ln in enumerate(lines):
        other = lines[perm[i]]
        expl = Explanation(unit=ln["unit"], text=other["explanation"], explainer=f"shuffled:{other['explainer']}",
                           tokens=tuple(other.get("tokens", ())),
                           exemplar_ids=tuple(ln["exemplar_ids"]["explainer"]))  # the unit's own: checked again
        held = UnitExemplars.from_dict(ln["exemplars"]).records("held_out")
        for name, sc in scorers.items():
            calls.append(sc.ascore(expl, held))
            keys.append((name, i))
    if client is not None:
        outs = client.run(calls, desc="shuffled")
    else:
        import asyncio

        async def all_of() -> list[Any]:
            return [await c for c in calls]

        outs = asyncio.run(all_of())
    res: dict[str, list[float | None]] = {name: [None] * len(lines) for name in scorers}
    for (name, i), out in zip(keys, outs, strict=True):
        res[name][i] = score_record(out.to_dict())
    return res


def mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return round(sum(v) / len(v), 4) if v else None


def _fmt(x: float | None) -> str:
    return "--" if x is None else f"{x:.2f}"


def _cell(text: str) -> str:
    """Table-safe text: pipes escaped, newlines as spaces, ``<`` as ``&lt;`` (a reply quoting HTML stays text)."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def peak_tokens(line: dict[str, Any], k: int = 5) -> list[str]:
    """The token at the largest activation of each of the unit's ``k`` strongest held-out exemplars with a
    positive activation (what a reader checks an explanation against)."""
    held = sorted(line["exemplars"]["held_out"], key=lambda e: -max(e["activations"], default=0.0))[:k]
    return [e["tokens"][max(range(len(e["activations"])), key=e["activations"].__getitem__)] for e in held
            if e["activations"] and max(e["activations"]) > 0]


def markdown(result: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    """A summary table (run x scorer: real mean / shuffled mean / units where real > shuffled) and, per run, the
    explanations verbatim with their scores."""
    names = result["scorers"]
    out = ["| run | explainer | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for run, r in result["runs"].items():
        cells = []
        for n in names:
            d = r["scorers"].get(n)
            cells.append("n/a" if d is None else f"{_fmt(d['real_mean'])} / {_fmt(d['shuffled_mean'])} "
                                                 f"({d['real_beats_shuffled']}/{d['pairs']})")
        out.append(f"| {Path(run).name} | {r['explainer']} | " + " | ".join(cells) + " |")
    out.append("")
    for run, lines in runs.items():
        out += [f"**{Path(run).name}**", "", "| unit | explanation | peak tokens (held-out top) | "
                + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for ln in lines:
            text = _cell(ln["explanation"])
            out.append(f"| {ln['unit']} | {text} | {_cell(', '.join(repr(t) for t in peak_tokens(ln)))} | "
                       + " | ".join(_fmt(ln["scores"].get(n)) for n in names) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output dirs of `circuitexplain explain`")
    p.add_argument("--scorers", default="simulation,detection,fuzzing,embedding")
    p.add_argument("--llm-base-url", default=os.environ.get("OPENAI_BASE_URL"))
    p.add_argument("--llm-model")
    p.add_argument("--llm-cache", type=Path, help="SQLite cache (default: the client's)")
    p.add_argument("--llm-concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the derangement's seed and the scorers' seed")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--markdown", type=Path, help="also write the tables (explanations verbatim, scores, baselines)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.scorers.split(",") if s.strip()]
    client = None
    from explainers.scoring import SCORERS

    if any(SCORERS[n].needs_llm for n in names):
        if not args.llm_base_url or not args.llm_model:
            p.error("LLM scorers need --llm-base-url (or OPENAI_BASE_URL) and --llm-model")
        from explainers.llm import LLMClient, LLMConfig

        client = LLMClient(LLMConfig(base_url=args.llm_base_url, model=args.llm_model,
                                     concurrency=args.llm_concurrency), args.llm_cache, seed=args.seed)
    result: dict[str, Any] = {"seed": args.seed, "scorers": names, "runs": {}}
    for run in args.runs:
        lines = load_run(run)
        use = [n for n in names if n != "tokens" or all(ln.get("tokens") for ln in lines)]
        scorers = {n: build_scorer(n, client=client, seed=args.seed) for n in use}
        shuf = shuffled_scores(lines, scorers, client, args.seed)
        per_scorer = {}
        for n in use:
            real = [ln["scores"].get(n) for ln in lines]
            pairs = [(r, s) for r, s in zip(real, shuf[n], strict=True) if r is not None and s is not None]
            per_scorer[n] = {"real_mean": mean(real), "shuffled_mean": mean(shuf[n]),
                             "real_beats_shuffled": sum(1 for r, s in pairs if r > s), "pairs": len(pairs),
                             "real": real, "shuffled": shuf[n]}
        result["runs"][str(run)] = {"units": [ln["unit"] for ln in lines],
                                    "explainer": lines[0]["explainer"] if lines else None, "scorers": per_scorer}
        print(f"{run}: {len(lines)} units")
        for n, d in per_scorer.items():
            print(f"  {n:<11} real {d['real_mean']}  shuffled {d['shuffled_mean']}  real > shuffled "
                  f"{d['real_beats_shuffled']}/{d['pairs']}")
    if client is not None:
        result["llm"] = dict(client.stats)
        client.close()
    if args.markdown is not None:
        md = markdown(result, {str(r): load_run(r) for r in args.runs})
        tmp_md = args.markdown.with_name(args.markdown.name + ".tmp")
        tmp_md.write_text(md)
        os.replace(tmp_md, args.markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
