"""``circuitexplain discover``: find a circuit and save it as a CircuitGraph JSON file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from circuits.algorithms import ALGORITHMS, DiscoveryConfig
from circuits.algorithms.base import ABLATIONS, LEVELS
from circuits.discover_features import FEATURE_METHODS

EPILOG = """\
methods:
  acdc        ACDC (Conmy et al. 2023): greedy edge removal from the output back; --threshold is tau
              (default 0.01 with --metric kl, the default metric). Checkpoints to OUT.ckpt.json; --resume
              continues an interrupted run. --warm-start N|P% tries only EAP-IG's top N edges (the rest
              are removed up front): minutes instead of hours on a 120k-edge model, at the price that an
              edge outside the top N can never be in the circuit.
  eap         edge attribution patching (Syed et al. 2023)
  eap-ig      EAP with integrated gradients (Hanna et al. 2024)
  greedy      minimal faithful circuit: removes the least harmful edge (exact patching of every remaining
              edge per step) while faithfulness stays >= --target; --warm-start N|P% (or --topk) starts from
              EAP-IG's top-N circuit instead of the full graph (much faster on larger graphs)
  node-patch  exact activation patching of each head / MLP (or neuron with --level neuron)
  node-atp    attribution patching (AtP) of heads / MLPs / neurons
  Without --topk / --threshold these keep the smallest top-k circuit (k from a grid of 1%..100% of the
  units, all measured in one batched engine call) whose faithfulness reaches --target (default 0.8).

  Gradient methods (eap, eap-ig, node-atp, and the warm starts) refuse metrics whose gradient says nothing:
  accuracy (not differentiable) and kl for eap / node-atp (zero at the clean run; eap-ig integrates it).
  Whether a method applies is decided from the model's config before any weights load.

feature circuits (--level feature, docs/features.md):
  --sae DIR[,DIR...] splices SAEs (SAELens layout; each cfg.json names its hook) into the model; the units
  are each site's candidate features (active on the task, at most --max-features-per-site, default 64) and
  one error node per site (what the SAE misses). Methods: node-atp, node-ig, node-patch (level feature:
  node scores) and eap, eap-ig (feature-to-feature and feature-to-logits edges between directly connected
  sites). The SAE directories, hooks and widths are checked against the model's config before its weights
  load.

held-out evaluation:
  --eval-prompts N measures the circuit again on N prompts it was not found on (a generator makes
  -n + N prompts and holds N out; a file holds out N of its lines; seeded by --seed, disjoint): the
  summary then reports the held-out faithfulness next to the in-sample one.

examples:
  circuitexplain discover --model ioi-2l --task ioi --method acdc --out ioi-acdc.json
  circuitexplain discover --model attn2l-induction --task induction --method eap --topk 5% --out ind.json
  circuitexplain discover --model ioi-2l --task ioi --method greedy --topk 40% --out ioi-greedy.json
  circuitexplain discover --model ioi-mamba --task ioi --method node-patch --level node --out m.json --json
  circuitexplain discover --model ioi-2l --task ioi --method eap-ig --topk 30 --eval-prompts 32 --out e.json
  circuitexplain discover --model smollm2-135m --task ioi --method acdc --warm-start 2000 --prompt-batch 8 \
      --dtype bfloat16 --out smol-acdc.json
  circuitexplain discover --model ioi-2l --task ioi --level feature --sae saes/r0,saes/r1 --method eap-ig \
      --max-features-per-site 32 --out ioi-features.json
"""


def parse_topk(text: str) -> tuple[int | None, float | None]:
    """``"20"`` -> (20, None); ``"5%"`` -> (None, 0.05); a one-line ValueError otherwise."""
    s = text.strip()
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return None, pct / 100.0
        k = int(s)
        if k < 1:
            raise ValueError
        return k, None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--topk {text!r}: give a count >= 1 (20) or a percentage (5%)") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "discover", help="discover a circuit (ACDC, EAP, EAP-IG, greedy pruning, node patching, AtP)",
        description="Find the circuit a model uses for a task and save it as CircuitGraph JSON "
                    "(networkx node-link; every scored unit with its score and in_circuit flag, plus "
                    "faithfulness and provenance).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name (see `circuitexplain zoo list`), HF model dir or hub name")
    p.add_argument("--task", required=True, help="task generator name (ioi, induction, greater_than, dyck) or a .jsonl file")
    p.add_argument("--method", required=True, choices=sorted(set(ALGORITHMS) | set(FEATURE_METHODS)),
                   help="discovery algorithm (--level feature: node-atp, node-ig, node-patch, eap, eap-ig)")
    p.add_argument("--ablation", default="resample", choices=ABLATIONS,
                   help="replace ablated activations by the corrupted run's (resample), the mean, or zero "
                        "(default: resample)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--topk", type=parse_topk, metavar="N|P%",
                     help="keep the N units (or P%% of them) of largest |score| (eap, eap-ig, node methods); "
                          "greedy: the size of its EAP-IG warm start")
    sel.add_argument("--threshold", type=float, metavar="X",
                     help="ACDC's tau, or the minimum |score| of a kept unit for the other methods")
    p.add_argument("--warm-start", type=parse_topk, metavar="N|P%", dest="warm_start",
                   help="acdc, greedy: only the N edges (or P%%) of largest EAP-IG |score| are candidates "
                        "(acdc removes the others up front; greedy starts from their connected circuit)")
    p.add_argument("--multi-removal", action="store_true",
                   help="greedy: per step remove as many least-harmful edges as jointly keep the target (1, 2, 4, "
                        "... measured) instead of one: ~log|C| steps instead of |C| on large graphs")
    p.add_argument("--target", type=float, default=0.8, dest="faithfulness_target", metavar="F",
                   help="scoring methods without --topk/--threshold: the smallest circuit with faithfulness "
                        ">= F; greedy: its stopping point (default 0.8)")
    p.add_argument("--level", choices=(*LEVELS, "feature"),
                   help="edge (acdc, eap, eap-ig, greedy), node or neuron (node methods), feature (SAE features "
                        "and error nodes, with --sae); default: the method's first level")
    p.add_argument("--sae", metavar="DIR[,DIR...]",
                   help="--level feature: SAE directories (SAELens layout), one per site")
    p.add_argument("--max-features-per-site", type=int, default=64, metavar="N", dest="max_features_per_site",
                   help="--level feature: candidate features per site, the N most active on the task "
                        "(default 64; 0 keeps only the error nodes)")
    p.add_argument("--min-activation", type=float, default=0.0, metavar="X", dest="min_activation",
                   help="--level feature: a candidate's largest |activation| on the task must exceed X (default 0)")
    p.add_argument("--metric", help="metric the method scores with: kl, logit_diff, prob_diff, accuracy "
                                    "(default: kl for acdc, the task's metric otherwise)")
    p.add_argument("-n", "--n-prompts", type=int, default=32, dest="n_prompts",
                   help="prompts to generate for a generator task (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of task generation (default 0)")
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--per-position", action="store_true", help="mean ablation per token position")
    p.add_argument("--qk-fix", action="store_true",
                   help="attribution methods: AtP*'s QK fix (Kramar et al. 2024): recompute attention patterns "
                        "for q/k edges instead of linearising the softmax")
    p.add_argument("--prompt-batch", type=int, metavar="B",
                   help="prompts per engine forward/backward (memory bounded by B, not the task; default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model weights' dtype (metrics, KL and attribution sums accumulate in float32; default "
                        "float32)")
    p.add_argument("--eval-prompts", type=int, default=0, metavar="N",
                   help="also measure the circuit on N held-out prompts (see 'held-out evaluation' below)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, dest="chunk_size", metavar="K",
                   help="most ablation masks per forward pass (memory budget; default: the engine's)")
    p.add_argument("--resume", action="store_true", help="acdc: continue from the checkpoint OUT.ckpt.json")
    p.add_argument("--checkpoint", metavar="FILE", help="acdc: checkpoint file (default OUT.ckpt.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the circuit graph")
    p.add_argument("--json", action="store_true", help="print one JSON summary object instead of text")
    p.set_defaults(func=run)


def sae_dirs(text: str) -> list[Path]:
    """``DIR[,DIR...]`` -> paths; one-line errors for an empty list or a repeated directory."""
    dirs = [Path(t.strip()) for t in text.split(",") if t.strip()]
    if not dirs:
        raise ValueError("--sae: give at least one SAE directory")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ValueError(f"--sae {text}: a directory is given twice")
    return dirs


def _site_width(hook: str, facts) -> int | None:
    """The width of a block hook's activation from the model's config (``None``: not known by name)."""
    last = hook.split(".")[-1]
    if ".mlp." in hook and last in ("hook_pre", "hook_post"):
        return facts.d_mlp
    if hook.endswith("attn.hook_z"):
        return facts.n_heads * facts.d_head
    if last in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                "hook_in", "hook_out"):
        return facts.d_model
    return None


def check_saes(dirs: list[Path], model: str) -> list[dict]:
    """Read each SAE's cfg.json (no weights) and check its hook against the model's config: a block hook of an
    existing layer, one SAE per hook, ``d_in`` equal to the hook's width. Returns the configs."""
    import re

    from circuits.models import model_facts
    from explainers.sae.io import read_sae_config  # the CLI is the one place circuits reads SAE directories

    facts = model_facts(model)
    seen: dict[str, Path] = {}
    cfgs = []
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"--sae {d}: no such directory")
        try:
            cfg = read_sae_config(d)
        except FileNotFoundError as e:
            raise ValueError(f"--sae {d}: {e}") from None
        if not (d / "sae_weights.safetensors").is_file():
            raise ValueError(f"--sae {d}: no sae_weights.safetensors")
        hook = str((cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or "")
        m = re.fullmatch(r"blocks\.(\d+)\..*hook_\w+", hook)
        if not m:
            raise ValueError(f"--sae {d}: its hook {hook!r} (cfg.json metadata.hook_name) is not a block hook "
                             "(blocks.<layer>....hook_<name>)")
        if int(m[1]) >= facts.n_layers:
            raise ValueError(f"--sae {d}: hook {hook} is absent from {model} ({facts.n_layers} layers)")
        if hook in seen:
            raise ValueError(f"--sae {d}: a second SAE for hook {hook} (first: {seen[hook]}); one SAE per site")
        seen[hook] = d
        width = _site_width(hook, facts)
        if width is not None and int(cfg.get("d_in", -1)) != width:
            raise ValueError(f"--sae {d}: d_in={cfg.get('d_in')} but {hook} of {model} has width {width}")
        cfgs.append(cfg)
    return cfgs


def run_features(args: argparse.Namespace) -> int:
    """``--level feature``: checks (method, metric, SAE directories against the model's config) before any
    weights load, then the model, the SAEs on its device, :func:`circuits.discover_features.discover_features`."""
    from circuits.discover_features import check_feature_method, discover_features
    from graphs.circuit import save

    if args.sae is None:
        raise ValueError("--level feature needs --sae DIR[,DIR...] (SAE directories, SAELens layout)")
    check_feature_method(args.method, args.metric, args.ig_steps)
    for flag, bad in (("--warm-start", args.warm_start), ("--resume", args.resume), ("--checkpoint", args.checkpoint),
                      ("--qk-fix", args.qk_fix), ("--per-position", args.per_position),
                      ("--multi-removal", args.multi_removal)):
        if bad:
            raise ValueError(f"{flag} does not apply to --level feature")
    if args.max_features_per_site < 0:
        raise ValueError(f"--max-features-per-site must be >= 0, got {args.max_features_per_site}")
    dirs = sae_dirs(args.sae)
    check_saes(dirs, args.model)
    from circuits.discover import make_task
    from circuits.models import load_model
    from explainers.bases.features import FeatureBasis

    topk, frac = args.topk if args.topk else (None, None)
    config = DiscoveryConfig(ablation=args.ablation, metric=args.metric, threshold=args.threshold, topk=topk,
                             topk_fraction=frac, faithfulness_target=args.faithfulness_target,
                             ig_steps=args.ig_steps, n_prompts=args.n_prompts, seed=args.seed,
                             chunk_size=args.chunk_size, progress=not args.no_progress,
                             prompt_batch=args.prompt_batch)
    t0 = time.perf_counter()
    make_task(args.task, 1, args.seed, args.model)  # an unknown task fails here, before the weights
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    dev = str(next(model.parameters()).device)
    bases, names = {}, {}
    for d in dirs:
        b = FeatureBasis.load(d, device=dev)
        bases[b.hook], names[b.hook] = b, d.resolve().name
    G = discover_features(model, args.task, args.method, bases, config, sae_names=names,
                          max_features_per_site=args.max_features_per_site, min_activation=args.min_activation,
                          name=args.model, eval_prompts=args.eval_prompts)
    out = Path(args.out)
    save(G, out)
    summary = summarize(G, out, time.perf_counter() - t0)
    print(json.dumps(summary, sort_keys=True) if args.json else format_summary(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    from circuits.discover import discover
    from graphs.circuit import save

    if args.level == "feature":
        return run_features(args)
    if args.sae is not None:
        raise ValueError("--sae applies to --level feature only")
    if args.method not in ALGORITHMS:
        raise ValueError(f"method {args.method!r} applies to --level feature only")

    topk, frac = args.topk if args.topk else (None, None)
    out = Path(args.out)
    checkpoint = None
    if args.method == "acdc":
        checkpoint = args.checkpoint or str(out.with_name(out.name + ".ckpt.json"))
        if Path(checkpoint).exists() and not args.resume:
            print(f"circuitexplain: found checkpoint {checkpoint} of an interrupted run; starting over "
                  "(pass --resume to continue it)", file=sys.stderr)
    elif args.resume or args.checkpoint:
        raise ValueError(f"--resume/--checkpoint apply to acdc only, not --method {args.method}")
    warm, warm_frac = args.warm_start if args.warm_start else (None, None)
    config = DiscoveryConfig(ablation=args.ablation, metric=args.metric, level=args.level, threshold=args.threshold,
                             topk=topk, topk_fraction=frac, faithfulness_target=args.faithfulness_target,
                             ig_steps=args.ig_steps, n_prompts=args.n_prompts,
                             seed=args.seed, per_position=args.per_position, chunk_size=args.chunk_size,
                             progress=not args.no_progress, checkpoint=checkpoint, resume=args.resume,
                             warm_start=warm, warm_start_fraction=warm_frac, qk_fix=args.qk_fix,
                             prompt_batch=args.prompt_batch, multi_removal=args.multi_removal)
    t0 = time.perf_counter()
    G = discover(args.model, args.task, args.method, config, device=args.device, dtype=args.dtype,
                 eval_prompts=args.eval_prompts)
    save(G, out)
    if checkpoint and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    summary = summarize(G, out, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(format_summary(summary))
    return 0


def summarize(G, out: Path, wall: float) -> dict:
    """The numbers the CLI reports about a discovered circuit graph."""
    level = G.graph.get("level", "edge")
    nodes = sum(1 for _, d in G.nodes(data=True) if d.get("in_circuit"))
    if level in ("edge", "feature-edge"):
        from graphs.circuit import edge_ids

        edges, total = len(edge_ids(G, in_circuit_only=True)), len(edge_ids(G, in_circuit_only=False))
    else:
        edges = sum(1 for _, _, d in G.edges(data=True) if d.get("in_circuit"))
        total = G.number_of_edges()
    g = G.graph
    return {"out": str(out), "model": g["model"], "task": g["task"], "method": g["method"], "level": level,
            "ablation": g["ablation"], "metric": g["metric"], "nodes": nodes, "nodes_total": G.number_of_nodes(),
            "edges": edges, "edges_total": total, "units": g.get("units"), "units_kept": g.get("units_kept"),
            "faithfulness": g.get("faithfulness"), "logit_diff_recovered": g.get("logit_diff_recovered"),
            "seconds": g.get("seconds"), "algorithm_seconds": g.get("algorithm_seconds"), "wall_seconds": wall,
            "cpu_seconds": time.process_time(),
            "forward_passes": g.get("forward_passes"),
            "ablations": g.get("ablations"), "ranking": g.get("ranking_kind"),
            "eval_prompts": g.get("eval_prompts"), "heldout_faithfulness": g.get("heldout_faithfulness"),
            "heldout_logit_diff_recovered": g.get("heldout_logit_diff_recovered")}


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_summary(s: dict) -> str:
    unit = {"edge": "edges", "feature-edge": "feature edges", "feature": "features and error nodes"}.get(
        s["level"], f"{s['level']}s")
    return "\n".join([
        f"{s['method']} on {s['model']} / {s['task']} ({s['ablation']} ablation, metric {s['metric']})",
        f"  kept       {s['units_kept']} of {s['units']} {unit}; circuit has {s['nodes']} nodes, {s['edges']} edges",
        f"  faithful   {_num(s['faithfulness'], '.3f')} of the task metric, "
        f"{_num(s['logit_diff_recovered'], '.3f')} of the logit difference recovered",
        *([f"  held out   {_num(s['heldout_faithfulness'], '.3f')} of the task metric, "
           f"{_num(s['heldout_logit_diff_recovered'], '.3f')} of the logit difference on {s['eval_prompts']} "
           f"prompts not used to find it"] if s.get("eval_prompts") else []),
        f"  cost       {s['forward_passes']} forward passes, {s['ablations']} ablations, "
        f"{_num(s['seconds'], '.2f')} s ({_num(s['algorithm_seconds'], '.2f')} s discovery, the rest measuring; "
        f"{_num(s['wall_seconds'], '.1f')} s with loading)",
        f"  saved to   {s['out']}",
    ])
