"""``eval circuits --level feature|neuron|node``: the options and the handler of the level comparison
(:mod:`evals.levels`). ``evals/cli.py`` adds these options to ``eval circuits`` and hands over when ``--level``
is given."""

from __future__ import annotations

import argparse
import json
import sys

LEVEL_HELP = """\
levels (--level, comma-separated; evals/levels.py, docs/levels.md):
  node      heads and MLPs                          (NodePatcher)
  neuron    heads and MLP neurons                   (NodePatcher over the graph with neurons)
  feature   SAE features + one error node per site  (FeaturePatcher; needs --sae DIR[,DIR...])
  With --level, eval circuits compares the levels instead of the methods: every level scores its units on the
  discovery prompts (--unit-scorer) and keeps its top k units for k in --units; faithfulness on the held-out
  prompts, random units as the baseline; the error nodes' share of the effect, with a warning when they carry
  most of it. Writes OUT/results.json, results.md, levels.png and OUT/level-NAME.json per level (resume).
  example:
    circuitexplain eval circuits --model ioi-2l --task ioi --level feature,neuron,node \\
        --sae SAE_DIR_1,SAE_DIR_2 --out out/levels-ioi
"""


def _levels(text: str) -> tuple[str, ...]:
    from evals.levels import LEVEL_NAMES

    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in LEVEL_NAMES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"--level {text!r}: give a comma-separated subset of "
                                         f"{','.join(LEVEL_NAMES)}")
    return items


def _dirs(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("--sae: give comma-separated SAE directories")
    return items


def _units(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--units {text!r}: give comma-separated unit counts such as "
                                         "1,10,100") from None


def add_level_args(p: argparse.ArgumentParser) -> None:
    """The level-comparison options of ``eval circuits``."""
    g = p.add_argument_group("level comparison (--level; see the end of this help)")
    g.add_argument("--level", type=_levels, metavar="L1,L2,...",
                   help="compare circuits at these levels (feature, neuron, node) instead of comparing methods")
    g.add_argument("--sae", type=_dirs, default=(), metavar="DIR[,DIR...]",
                   help="--level feature: SAE directories (SAELens layout, e.g. from `sae train`), one per site")
    g.add_argument("--units", type=_units, metavar="K1,K2,...",
                   help="circuit sizes in units kept (default 1, 2, 5, 10, 20, ... up to every unit of a level)")
    g.add_argument("--unit-scorer", choices=("atp", "patch"), default="atp",
                   help="how each level ranks its units: attribution patching (default) or exact patching")
    g.add_argument("--max-features-per-site", type=int, metavar="N",
                   help="feature level: candidate features per site, the most active on the task (default: every "
                        "feature active on the discovery prompts)")
    g.add_argument("--no-neuron-heads", action="store_true",
                   help="neuron level: neurons only (default: heads and neurons)")
    g.add_argument("--error-warning", type=float, default=0.5, metavar="F",
                   help="warn when the error nodes alone reach f >= F, or all features without them f < 1 - F "
                        "(default 0.5)")
    p.epilog = (p.epilog or "") + "\n" + LEVEL_HELP


def run_levels(args: argparse.Namespace) -> int:
    """Handler of ``eval circuits --level ...``."""
    from evals.levels import LevelsConfig, compare_levels
    from evals.levels_report import format_table, rows, write_levels_report

    if "feature" in args.level and not args.sae:
        raise SystemExit("eval circuits: --level feature needs --sae DIR[,DIR...]")
    config = LevelsConfig(levels=args.level, saes=args.sae, n_prompts=args.n_prompts, split=args.split,
                          seed=args.seed, ablation=args.ablation, scorer=args.unit_scorer, units=args.units,
                          random_seeds=args.random_seeds, max_features_per_site=args.max_features_per_site,
                          neuron_heads=not args.no_neuron_heads, error_warning=args.error_warning,
                          prompt_batch=args.prompt_batch, chunk_size=args.chunk_size, device=args.device,
                          dtype=args.dtype)
    report = compare_levels(args.model, args.task, config, out=args.out)
    paths = write_levels_report(report, args.out)
    table = rows(report)
    if args.json:
        print(json.dumps(table))
    else:
        s = report.split
        print(f"{report.model} / {report.task}: faithfulness by level, discovered on {s['n_discovery']} prompts, "
              f"measured on {s['n_heldout']} held out")
        print(format_table(table))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    for w in report.warnings:
        print(w, file=sys.stderr if args.json else sys.stdout)
    return 0


__all__ = ["add_level_args", "run_levels", "LEVEL_HELP"]
