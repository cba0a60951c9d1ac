"""``circuitexplain eval``: evaluate circuit-discovery methods (``eval circuits``)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
what it computes (MIB circuit track, Mueller et al. 2025):
  faithfulness f = (m(circuit) - m(empty)) / (m(full model) - m(empty)) of each method's top-scoring edges
  at 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 %% of the edges (floor of the count), all through one exact
  edge patcher; CPR = area under f, CMD = area under |1 - f| (trapezoids over the fraction of edges, as MIB);
  KL to the full model alongside; the same for random circuits of each size (mean over --random-seeds seeds,
  row "random"); AUC of the |score| ranking against the reference circuit where the model has one
  (attn2l-induction: measured induction circuit; tracr-reverse, tracr-frac_prevs: exact by construction).

outputs in --out DIR:
  results.json   list of rows {method, cpr, cmd, auc, seconds, forward_passes, edges} (auc null without a
                 reference; the "random" row has edges null)
  results.csv, results.md, details.json (curves, KL, ROC points, reference, settings)
  faithfulness.png (f and KL vs % of edges, log x), roc.png (with a reference)

examples:
  circuitexplain eval circuits --model ioi-2l --task ioi --methods eap,eap-ig --out out/ioi
  circuitexplain eval circuits --model attn2l-induction --task induction --methods acdc,eap,eap-ig --out out/ind
  circuitexplain eval circuits --model tracr-reverse --methods eap,eap-ig,node-patch --out out/rev
"""


def _methods(text: str) -> tuple[str, ...]:
    items = tuple(m.strip() for m in text.split(",") if m.strip())
    if not items:
        raise argparse.ArgumentTypeError("--methods: give a comma-separated list such as eap,eap-ig")
    return items


def _percentages(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: give comma-separated percentages such as 1,10,100") \
            from None


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("eval", help="evaluate circuit-discovery methods (faithfulness, CPR/CMD, AUC)",
                                  description="Evaluate circuit-discovery methods.")
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "circuits", help="compare methods on one model and task: CPR, CMD, AUC, cost, plots",
        description="Run each discovery method on a model and task, then measure faithfulness curves "
                    "(CPR, CMD, KL) against a random baseline, ground-truth AUC where a reference circuit "
                    "exists, and cost; write a table, JSON/CSV/Markdown and PNG plots.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="zoo name (ioi-2l, attn2l-induction, ...), tracr-reverse, tracr-frac_prevs, HF dir or hub name")
    p.add_argument("--task", help="task generator name (ioi, induction, greater_than, dyck) or a .jsonl file; "
                                  "tracr models use their own task (omit)")
    p.add_argument("--methods", type=_methods, default=("eap", "eap-ig"),
                   help="comma-separated discovery methods (acdc, eap, eap-ig, node-patch, node-atp); "
                        "default eap,eap-ig")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the results and plots")
    p.add_argument("--ablation", default="resample", choices=("resample", "mean", "zero"),
                   help="ablation for discovery and evaluation (default resample)")
    p.add_argument("-n", "--n-prompts", type=int, default=32, dest="n_prompts",
                   help="prompts to generate (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the methods and the random circuits")
    p.add_argument("--random-seeds", type=int, default=5, help="random circuits per size (default 5; 0: none)")
    p.add_argument("--ranking", choices=("abs", "signed"), default="abs",
                   help="rank edges by |score| (default) or by signed contribution")
    p.add_argument("--sizes", type=_percentages, metavar="P1,P2,...",
                   help="circuit sizes in %% of edges (default MIB's 0.1,0.2,0.5,1,2,5,10,20,50,100)")
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--per-position", action="store_true", help="mean ablation per token position")
    p.add_argument("--batch-size", type=int, dest="chunk_size", metavar="K",
                   help="most ablation masks per forward pass (memory budget)")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON instead of a table")
    p.set_defaults(func=run_circuits)


def run_circuits(args: argparse.Namespace) -> int:
    from evals.faithfulness import MIB_PERCENTAGES, FaithfulnessConfig
    from evals.run import EvalConfig, evaluate_methods, format_table, write_report

    fcfg = FaithfulnessConfig(percentages=args.sizes or MIB_PERCENTAGES, ranking=args.ranking,
                              random_seeds=args.random_seeds, seed=args.seed)
    config = EvalConfig(methods=args.methods, n_prompts=args.n_prompts, seed=args.seed, ablation=args.ablation,
                        per_position=args.per_position, ig_steps=args.ig_steps, chunk_size=args.chunk_size,
                        device=args.device, faithfulness=fcfg)
    report = evaluate_methods(args.model, args.task, config)
    paths = write_report(report, args.out)
    if args.json:
        print(json.dumps(report.rows))
    else:
        f = report.faithfulness
        print(f"{report.model} / {report.task}: metric {f.metric} full {f.m_full:.4g}, empty {f.m_empty:.4g}; "
              f"{f.n_edges} edges")
        print(format_table(report.rows))
        if report.reference is None:
            print("(no reference circuit for this model: AUC not available)")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
