"""``circuitexplain study saes | centring``: the SAE studies of issue #11 (items 7 and 6); see docs/study.md.

Registered through the entry point ``study = "evals.cli_study:register"``. Every request is checked (models
known, widths, k, sparsity values, budget) before any weights load; ``--plan`` lists the units and stops.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

EPILOG_SAES = """\
protocol: per model, the residual stream at the same relative depth (--depth 0.5: blocks.{c-1}.hook_resid_post
with c = round(depth * n_layers)), an activation store of the same --tokens (the model's own corpus: its zoo
task, fortunes for smollm2-135m; collected once per (model, hook) and shared), one SAE per dictionary size in
--widths (multiples of d_model), all with the same training (--train-tokens, --train-batch, --lr, --seed) and
the same relative sparsity (--k 0.125x = d_model / 8 for topk / batchtopk). Metrics on the held-out shards.
Each SAE is a unit in CACHE/saes/KEY; a rerun skips finished units and resumes a killed one.

examples:
  circuitexplain study saes --models ioi-2l,ioi-2l-gpt2,ioi-mamba,smollm2-135m --family ioi \\
      --widths 2x,4x,8x --out docs/results/study/saes
  circuitexplain study saes --models ioi-2l --widths 4x --plan --out /tmp/x      # list the units only
"""

EPILOG_CENTRING = """\
protocol: per model, every --archs x --centrings x sparsity value x --seeds at one --width, at the hook of
--depth; sparsity: --k for topk / batchtopk (multiples of d_model), --l1 for relu-l1, --thresholds for jumprelu
(its initial threshold; with this short training the thresholds move little, so it sets L0). Curves of EV, CE
recovered, error_linear_r2 and error_kl_ratio against L0 are compared at matched L0 (linear interpolation in
log L0 at points every curve covers; mean and std over seeds). Output: study.json (rows, matched, effects),
study.csv, study.md, centring-MODEL.png.

examples:
  circuitexplain study centring --models ioi-2l --seeds 0,1,2 --out docs/results/study/centring-ioi-2l
  circuitexplain study centring --models smollm2-135m --width 2x --ce-contexts 16 \\
      --out docs/results/study/centring-smollm2-135m
"""


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str, what: str) -> list[float]:
    try:
        v = [float(x) for x in _csv(s)]
    except ValueError:
        raise ValueError(f"{what} {s!r}: expected comma-separated numbers") from None
    if not v or any(x <= 0 for x in v):
        raise ValueError(f"{what} {s!r}: need at least one value, all > 0")
    return v


def _ints(s: str, what: str) -> list[int]:
    try:
        v = [int(x) for x in _csv(s)]
    except ValueError:
        raise ValueError(f"{what} {s!r}: expected comma-separated integers") from None
    if not v or len(set(v)) != len(v):
        raise ValueError(f"{what} {s!r}: need distinct values")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="comma-separated zoo or pretrained model names")
    p.add_argument("--out", required=True, type=Path, help="where study.json/.csv/.md and the plots go")
    p.add_argument("--cache", type=Path, help="stores and SAEs (default $CIRCUITEXPLAIN_CACHE/study)")
    p.add_argument("--seeds", default="0", help="comma-separated SAE seeds (default 0)")
    p.add_argument("--depth", type=float, default=0.5, help="relative depth of the residual hook (default 0.5)")
    p.add_argument("--tokens", type=int, default=50_000, help="activations collected per model (default 50000)")
    p.add_argument("--train-tokens", type=int, default=300_000, help="SAE training tokens (default 300000)")
    p.add_argument("--train-batch", type=int, default=2048, help="SAE batch size (default 2048)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of store shards held out (default 0.1)")
    p.add_argument("--ce-contexts", type=int, default=32, help="held-out contexts for CE and KL (default 32)")
    p.add_argument("--trim-contexts", action="store_true",
                   help="CE / KL one held-out context at a time without padding, clean and zero-ablation passes "
                        "computed once per store (evals/study_eval.py; same numbers, 2 LM passes per SAE, not 4)")
    p.add_argument("--plan", action="store_true", help="list the units (and which are done) and stop")
    p.add_argument("--done-only", action="store_true",
                   help="write the outputs from the finished units only (trains nothing, loads no model); the "
                        "outputs say how many of the planned units they hold")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("study", help="SAE studies: centring at matched L0, architectures and scale",
                                  description="The SAE studies of issue #11 (docs/study.md).")
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="study_command", metavar="COMMAND")

    p = sub.add_parser("saes", help="SAEs across model architectures and sizes, and a dictionary-size sweep",
                       description="Train SAEs with the same width ratio, token budget and relative depth on "
                                   "several models; EV and CE recovered vs dictionary size, feature density.",
                       epilog=EPILOG_SAES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--family", choices=("ioi",), help="add the IOI size family (ioi-2l-d32, ioi-2l-d64, ioi-2l, "
                                                      "ioi-3l-d64, ioi-4l-d64)")
    p.add_argument("--widths", default="2x,4x,8x", help="dictionary sizes, multiples of d_model (default 2x,4x,8x)")
    p.add_argument("--reference-width", default="4x", help="the width compared across models (default 4x)")
    p.add_argument("--arch", default="topk", choices=("relu-l1", "topk", "batchtopk", "jumprelu"))
    p.add_argument("--centring", default="learned", choices=("none", "learned", "mean"))
    p.add_argument("--k", default="0.125x", help="topk / batchtopk k: integer or multiple of d_model (0.125x)")
    p.add_argument("--l1", type=float, default=5.0, help="relu-l1 coefficient (default 5)")
    p.add_argument("--threshold", type=float, default=1.0, help="jumprelu initial threshold (default 1)")
    p.set_defaults(func=saes_handler)

    p = sub.add_parser("centring", help="each SAE architecture x centring over a sparsity sweep, at matched L0",
                       description="Does mean-centring reduce the structured part of SAE error at matched L0?",
                       epilog=EPILOG_CENTRING, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--archs", default="relu-l1,topk,batchtopk,jumprelu", help="SAE architectures (default all)")
    p.add_argument("--centrings", default="none,learned,mean", help="centrings (default all three)")
    p.add_argument("--width", default="4x", help="latents: integer or multiple of d_model (default 4x)")
    p.add_argument("--k", default="0.03125x,0.0625x,0.125x", help="topk / batchtopk sweep (default d/32, d/16, d/8)")
    p.add_argument("--l1", default="4,8,16", help="relu-l1 coefficient sweep (default 4,8,16)")
    p.add_argument("--thresholds", default="0.5,1,2", help="jumprelu initial-threshold sweep (default 0.5,1,2)")
    p.add_argument("--points", type=int, default=3, help="matched-L0 points per architecture (default 3)")
    p.set_defaults(func=centring_handler)


def _facts(models: list[str]) -> dict[str, Any]:
    from circuits.models import model_facts
    from circuits.pretrained import PRETRAINED
    from circuits.zoo import RECIPES

    if not models:
        raise ValueError("--models: no model given")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ValueError(f"--models: {', '.join(dup)} given twice")
    known = sorted(RECIPES) + sorted(PRETRAINED)
    for m in models:
        if m not in RECIPES and m not in PRETRAINED:
            raise ValueError(f"--models: unknown model {m!r}; one of {', '.join(known)}")
    facts = {m: model_facts(m) for m in models}
    for m, f in facts.items():
        if f.family != "transformer" and f.model_type != "mamba":
            raise ValueError(f"--models: {m} ({f.model_type}) has no residual hooks this study knows")
    return facts


def _budget(args: argparse.Namespace) -> Any:
    from evals.study import Budget

    if args.ce_contexts < 1:
        raise ValueError(f"--ce-contexts must be >= 1, got {args.ce_contexts}")
    return Budget(tokens=args.tokens, train_tokens=args.train_tokens, batch_size=args.train_batch, lr=args.lr,
                  depth=args.depth, holdout=args.holdout, ce_contexts=args.ce_contexts,
                  trim_contexts=args.trim_contexts)


def _cache(args: argparse.Namespace) -> Path:
    import os

    if args.cache is not None:
        return args.cache
    return Path(os.environ.get("CIRCUITEXPLAIN_CACHE", "~/.cache/circuitexplain")).expanduser() / "study"


def _run(args: argparse.Namespace, study: str, units: list[Any], settings: dict[str, Any]) -> int:
    from evals.study import run_units, unit_done
    from evals.study_report import write_study

    cache = _cache(args)
    if args.plan:
        for u in units:
            print(f"{'done' if unit_done(cache, u) else 'todo'}  {u.key}")
        print(f"{len(units)} units, {sum(unit_done(cache, u) is None for u in units)} to do; cache {cache}")
        return 0
    if args.done_only:
        rows = [r for r in (unit_done(cache, u) for u in units) if r is not None]
        if not rows:
            raise ValueError(f"--done-only: none of the {len(units)} planned units is finished in {cache}")
    else:
        import torch

        torch.set_num_threads(args.threads)
        rows = run_units(units, cache, progress=not args.no_progress)
    settings = {**settings, "units_planned": len(units), "units_reported": len(rows)}
    command = "circuitexplain " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["study"] else \
        f"circuitexplain study {study} ..."
    write_study(args.out, study, rows, settings, command)
    print(f"{len(rows)} of {len(units)} planned SAEs -> {args.out}/study.json, study.csv, study.md and plots")
    return 0


def saes_handler(args: argparse.Namespace) -> int:
    from evals.study import SIZE_FAMILY, parse_ratio, plan_saes

    models = _csv(args.models)
    if args.family == "ioi":
        models += [m for m in SIZE_FAMILY if m not in models]
    facts = _facts(models)
    widths = _csv(args.widths)
    if not widths:
        raise ValueError("--widths: no width given")
    ref = args.reference_width
    if ref not in widths:
        raise ValueError(f"--reference-width {ref} is not one of --widths {args.widths}")
    for w in widths:
        if not w.endswith("x"):
            raise ValueError(f"--widths {w!r}: give multiples of d_model (like 4x) so models compare")
        for f in facts.values():
            parse_ratio(w, f.d_model, "--widths")
    if args.arch in ("topk", "batchtopk"):
        for m, f in facts.items():
            k = parse_ratio(args.k, f.d_model, "--k")
            smallest = min(parse_ratio(w, f.d_model, "--widths") for w in widths)
            if k > smallest:
                raise ValueError(f"--k {args.k} gives k={k} for {m}, more than its smallest width {smallest}")
    seeds = _ints(args.seeds, "--seeds")
    budget = _budget(args)
    units = plan_saes(models, facts, widths, arch=args.arch, centring=args.centring, k=args.k, l1=args.l1,
                      threshold=args.threshold, seeds=seeds, budget=budget)
    settings = {"models": models, "widths": widths, "reference_width_ratio": float(ref[:-1]), "arch": args.arch,
                "centring": args.centring, "k": args.k, "seeds": seeds, "budget": budget.to_dict()}
    return _run(args, "saes", units, settings)


def centring_handler(args: argparse.Namespace) -> int:
    from evals.study import parse_ratio, plan_centring
    from explainers.sae.model import ARCHS, CENTRINGS

    models = _csv(args.models)
    facts = _facts(models)
    archs, centrings = _csv(args.archs), _csv(args.centrings)
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"--archs: unknown architecture {a!r}; one of {', '.join(ARCHS)}")
    for c in centrings:
        if c not in CENTRINGS:
            raise ValueError(f"--centrings: unknown centring {c!r}; one of {', '.join(CENTRINGS)}")
    if len(centrings) < 2:
        raise ValueError("--centrings: a comparison needs at least two centrings")
    ks = _csv(args.k)
    l1s, thresholds = _floats(args.l1, "--l1"), _floats(args.thresholds, "--thresholds")
    for m, f in facts.items():
        width = parse_ratio(args.width, f.d_model, "--width")
        for k in ks:
            kv = parse_ratio(k, f.d_model, "--k")
            if kv > width:
                raise ValueError(f"--k {k} gives k={kv} for {m}, more than --width {args.width} = {width}")
    if args.points < 1:
        raise ValueError(f"--points must be >= 1, got {args.points}")
    seeds = _ints(args.seeds, "--seeds")
    budget = _budget(args)
    units = plan_centring(models, facts, archs=archs, centrings=centrings, width=args.width, ks=ks, l1s=l1s,
                          thresholds=thresholds, seeds=seeds, budget=budget)
    settings = {"models": models, "archs": archs, "centrings": centrings, "width": args.width, "k": ks,
                "l1": l1s, "thresholds": thresholds, "seeds": seeds, "points": args.points,
                "budget": budget.to_dict()}
    return _run(args, "centring", units, settings)
