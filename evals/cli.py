"""``circuitexplain eval``: evaluate circuit-discovery methods (``eval circuits``)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
what it computes (MIB circuit track, Mueller et al. 2025):
  -n prompts are split (seeded by --seed, disjoint): every method discovers on 1 - --split of them, and
  everything below is measured on the held-out rest (columns cpr, cmd, f, kl) and, for comparison, on the
  discovery prompts (cpr_train, cmd_train, f_train: in-sample, where greedy and the size budget chose).
  faithfulness f = (m(circuit) - m(empty)) / (m(full model) - m(empty)) of each method's circuits at 0.1,
  0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 %% of the edges (floor of the count; the circuit at size k is the
  connected one `discover --topk k` keeps), all through one exact edge patcher per prompt set; CPR = area
  under f, CMD = area under |1 - f| (trapezoids over the fraction of edges, as MIB); KL to the full model
  alongside; the same for random rankings (mean over --random-seeds seeds, row "random"); f and KL of each
  method's own circuit; AUC against the reference circuit where the model has one (attn2l-induction:
  measured induction circuit; tracr-reverse, tracr-frac_prevs: exact by construction, see --reference).

rankings (column "ranking"): each curve and ROC ranks by what the method's result means:
  abs-score      |score| (EAP, EAP-IG, node methods: each unit's own estimated effect)
  removal-order  greedy: the order of removal, elimination continued past the target to the empty circuit
  acdc-tau       ACDC: one ACDC run per tau (--acdc-taus of them); an edge ranks by the largest tau that keeps
                 it; its AUC is Conmy et al.'s: one ROC point per tau

tracr (Conmy et al.'s protocol): the metric is read at every output position (--positions all), ACDC
scores with the l2 distance to the clean output, and the reference follows the ablation: the program
circuit under --ablation zero, the task circuit (clean/corrupt difference) under resample / mean.

outputs in --out DIR:
  results.json   list of rows {method, ranking, cpr, cmd, cpr_train, cmd_train, f, f_train, kl, auc, seconds,
                 forward_passes, edges} (auc null without a reference; the "random" row has f, kl, edges null)
  results.csv, results.md, details.json (curves, KL, ROC points, ACDC sweeps, reference, split, settings)
  faithfulness.png (held out), faithfulness_train.png (discovery prompts), roc.png (with a reference)

examples:
  circuitexplain eval circuits --model ioi-2l --task ioi --methods eap,eap-ig --out out/ioi
  circuitexplain eval circuits --model attn2l-induction --task induction --methods acdc,eap,eap-ig --out out/ind
  circuitexplain eval circuits --model tracr-reverse --methods acdc,eap,eap-ig --ablation zero --out out/rev
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
                   help="comma-separated discovery methods (acdc, eap, eap-ig, greedy, node-patch, node-atp); "
                        "default eap,eap-ig")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the results and plots")
    p.add_argument("--ablation", default="resample", choices=("resample", "mean", "zero"),
                   help="ablation for discovery and evaluation (default resample)")
    p.add_argument("-n", "--n-prompts", type=int, default=64, dest="n_prompts",
                   help="prompt pairs in all, discovery + held out (default 64)")
    p.add_argument("--split", type=float, default=0.5, metavar="F",
                   help="fraction of the prompts held out for evaluation (default 0.5; 0: evaluate in-sample)")
    p.add_argument("--cross-fit", action="store_true",
                   help="also discover on the held-out prompts and measure on the others, and average both ways: "
                        "in-sample minus held-out is then the overfit alone (twice the cost)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the task, the split, the methods and the random circuits")
    p.add_argument("--random-seeds", type=int, default=5, help="random circuits per size (default 5; 0: none)")
    p.add_argument("--ranking", choices=("abs", "signed"), default="abs",
                   help="rank edges by |score| (default) or by signed contribution")
    p.add_argument("--sizes", type=_percentages, metavar="P1,P2,...",
                   help="circuit sizes in %% of edges (default MIB's 0.1,0.2,0.5,1,2,5,10,20,50,100)")
    p.add_argument("--circuits", choices=("connected", "topk"), default="connected",
                   help="the circuit at size k: the connected one `discover --topk k` keeps (default) or the "
                        "literal top k edges")
    p.add_argument("--reference", choices=("auto", "program", "task"), default="auto",
                   help="tracr reference: follows the ablation (auto: program circuit under zero, task circuit "
                        "under resample/mean), or forced")
    p.add_argument("--positions", choices=("all", "last"), default="all",
                   help="tracr: read the metric at every output position (Conmy et al.; default) or the last")
    p.add_argument("--acdc-taus", type=int, default=12, metavar="T",
                   help="ACDC: taus in its sweep, geometric over 1e-4..1 x the metric's range (default 12)")
    p.add_argument("--acdc-metric", metavar="M", help="ACDC's metric (default: l2 for tracr models, kl otherwise)")
    p.add_argument("--target", type=float, default=0.8, dest="faithfulness_target", metavar="F",
                   help="greedy's faithfulness target and the scoring methods' default size (default 0.8)")
    p.add_argument("--greedy-warm-start", type=float, default=0.4, metavar="F",
                   help="greedy starts from EAP-IG's top fraction F of the edges (default 0.4; 0: the full graph)")
    p.add_argument("--qk-fix", action="store_true", help="attribution methods: AtP*'s QK fix (Kramar et al. 2024)")
    p.add_argument("--prompt-batch", type=int, metavar="B", help="prompts per engine forward (memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--per-position", action="store_true", help="mean ablation per token position")
    p.add_argument("--batch-size", type=int, dest="chunk_size", metavar="K",
                   help="most ablation masks per forward pass (memory budget)")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON instead of a table")
    from evals.levels_cli import add_level_args

    add_level_args(p)  # --level feature|neuron|node: evals/levels.py
    p.set_defaults(func=run_circuits)


def run_circuits(args: argparse.Namespace) -> int:
    if getattr(args, "level", None):
        from evals.levels_cli import run_levels

        return run_levels(args)
    from evals.faithfulness import MIB_PERCENTAGES, FaithfulnessConfig
    from evals.report import format_table, split_sentence, write_report
    from evals.run import EvalConfig, evaluate_methods

    fcfg = FaithfulnessConfig(percentages=args.sizes or MIB_PERCENTAGES, ranking=args.ranking,
                              random_seeds=args.random_seeds, seed=args.seed, circuits=args.circuits)
    config = EvalConfig(methods=args.methods, n_prompts=args.n_prompts, split=args.split, seed=args.seed,
                        ablation=args.ablation, per_position=args.per_position, ig_steps=args.ig_steps,
                        chunk_size=args.chunk_size, device=args.device, faithfulness=fcfg, reference=args.reference,
                        positions=args.positions, acdc_taus=args.acdc_taus, acdc_metric=args.acdc_metric,
                        qk_fix=args.qk_fix, prompt_batch=args.prompt_batch, dtype=args.dtype,
                        faithfulness_target=args.faithfulness_target, greedy_warm_start=args.greedy_warm_start,
                        cross_fit=args.cross_fit)
    report = evaluate_methods(args.model, args.task, config)
    paths = write_report(report, args.out)
    if args.json:
        print(json.dumps(report.rows))
    else:
        f = report.faithfulness
        print(f"{report.model} / {report.task}: metric {f.metric} full {f.m_full:.4g}, empty {f.m_empty:.4g}; "
              f"{f.n_edges} edges")
        print(split_sentence(report))
        print(format_table(report.rows))
        if report.reference is None:
            print("(no reference circuit for this model: AUC not available)")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
