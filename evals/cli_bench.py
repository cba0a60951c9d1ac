"""``circuitexplain bench patching``: time the patching engine on a model (see :mod:`patching.bench`).

Registered through the entry point ``bench = "evals.cli_bench:register"``. The handler loads the model
and the task through ``circuits`` (imported inside the handler only: the engine itself never imports
``circuits``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
figures (JSON keys):
  naive_s_per_ablation           one hooked forward per ablation (every head / MLP), seconds
  batched_s_per_ablation         NodePatcher, CHUNK single-node masks per forward, seconds per mask
  batched_edge_s_per_ablation    EdgePatcher, random edge sets (p=1/2), seconds per mask
  plain_forward_s_per_example    unhooked forward on the B clean prompts / B
  eap_forward_backward_units     EAP wall time / one forward+backward on the B prompts
  eap_ig_forward_backward_units  EAP-IG (--ig-steps) wall time in the same unit
One ablation = the whole batch of B prompts under one mask; compare batched_s_per_ablation / B with
plain_forward_s_per_example.

examples:
  circuitexplain bench patching --model ioi-2l --out bench-ioi.json
  circuitexplain bench patching --model greater-than-2l --n 32 --threads 2 --out bench-gt.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("bench", help="timing benchmarks (patching engine)",
                                  description="Timing benchmarks.")
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    p = sub.add_parser(
        "patching", help="batched vs naive activation patching, EAP and EAP-IG cost",
        description="Time naive per-ablation forwards against the engine's batched node and edge patching, "
                    "a plain forward, and EAP / EAP-IG in units of one forward+backward; print a table and "
                    "write the figures as JSON.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name (ioi-2l, greater-than-2l, ...), HF model dir or hub name")
    p.add_argument("--out", required=True, type=Path, help="JSON file to write the figures to")
    p.add_argument("--task", help="task generator name or .jsonl file (default: the zoo model's training task)")
    p.add_argument("-n", "--n", type=int, default=32, dest="n", help="prompts in the task batch B (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of task generation and random masks (default 0)")
    p.add_argument("--ablation", default="resample", choices=("resample", "mean", "zero"),
                   help="ablation to patch with (default resample)")
    p.add_argument("--metric", help="metric (default: the task's)")
    p.add_argument("--chunk", type=int, default=32, help="masks per batched forward (default 32)")
    p.add_argument("--edge-masks", type=int, default=64, help="random edge sets to time (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (round-robin over the figures); the best is kept (default 5)")
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG steps (default 5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    p.set_defaults(func=handler)


def _default_task(model: str) -> str:
    from circuits.zoo import RECIPES

    if model in RECIPES:
        return RECIPES[model].data
    raise ValueError(f"--task is required for {model!r} (not a zoo model with a known task)")


def handler(args: argparse.Namespace) -> int:
    import torch

    from circuits.models import load_model, load_tokenizer
    from circuits.tasks import get_task
    from patching.bench import BenchConfig, bench_patching, format_table

    for name in ("n", "chunk", "edge_masks", "repeats", "ig_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task or _default_task(args.model), n=args.n, seed=args.seed, metric=args.metric)
    model = load_model(args.model, device=args.device)
    batch = task.batch(load_tokenizer(args.model), device=args.device or _device(model))
    config = BenchConfig(ablation=args.ablation, metric=task.metric, chunk=args.chunk, n_edge_masks=args.edge_masks,
                         repeats=args.repeats, ig_steps=args.ig_steps, seed=args.seed)
    result: dict[str, Any] = bench_patching(model, batch, config)
    result.update(model=args.model, task=task.name)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _device(model: Any) -> Any:
    from patching.model_info import model_device

    return model_device(model)
