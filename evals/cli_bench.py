"""``circuitexplain bench patching``: time the patching engine on a model (see :mod:`patching.bench`).

Registered through the entry point ``bench = "evals.cli_bench:register"``. The handler loads the model
and the task through ``circuits`` (imported inside the handler only: the engine itself never imports
``circuits``).
"""

from __future__ import annotations

import argparse
import json
import os
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
  edge_scores_s, eap_ig_s        EAP / EAP-IG on every edge of the graph, seconds
  n_edges, peak_rss_bytes        edges scored; the process's peak resident memory at the end
  eap_ig_memory_peak_rss_bytes   with --memory-n M: peak resident memory while EAP-IG runs on M prompts
One ablation = the whole batch of B prompts under one mask; compare batched_s_per_ablation / B with
plain_forward_s_per_example. Timings suffer when other processes use the cores: the JSON records
`load_average` (from os.getloadavg) before and after.

examples:
  circuitexplain bench patching --model ioi-2l --out bench-ioi.json
  circuitexplain bench patching --model greater-than-2l --n 32 --threads 2 --out bench-gt.json
  circuitexplain bench patching --model smollm2-135m --task ioi -n 8 --chunk auto --max-ablations 60 \
      --edge-masks 8 --repeats 2 --memory-n 32 --out benchmarks/patching-smollm2-135m.json
"""


def _chunk(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)  # checked to be >= 1 by the handler, before any model is loaded
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunk must be a positive integer or 'auto', got {value!r}") from None


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
    p.add_argument("--chunk", type=_chunk, default=32,
                   help="masks per batched forward, or 'auto': as many as the engine's memory budget allows "
                        "(default 32)")
    p.add_argument("--prompt-batch", type=int, default=None,
                   help="prompts per engine forward (default: the engine's choice; all for attribution)")
    p.add_argument("--max-ablations", type=int, default=None,
                   help="time a seeded sample of this many heads / MLPs instead of all (large models)")
    p.add_argument("--memory-n", type=int, default=None,
                   help="also measure peak resident memory of EAP-IG on this many prompts (e.g. 32)")
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

    for name in ("n", "chunk", "edge_masks", "repeats", "ig_steps", "prompt_batch", "max_ablations", "memory_n"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    task_name = args.task or _default_task(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tok = load_tokenizer(args.model)
    task = get_task(task_name, n=args.n, seed=args.seed, metric=args.metric, tokenizer=tok)
    model = load_model(args.model, device=args.device)
    dev = args.device or _device(model)
    batch = task.batch(tok, device=dev)
    memory_batch = None
    if args.memory_n:
        memory_batch = get_task(task_name, n=args.memory_n, seed=args.seed + 1, metric=args.metric,
                                tokenizer=tok).batch(tok, device=dev)
    config = BenchConfig(ablation=args.ablation, metric=task.metric, chunk=args.chunk, n_edge_masks=args.edge_masks,
                         repeats=args.repeats, ig_steps=args.ig_steps, seed=args.seed, max_ablations=args.max_ablations,
                         prompt_batch=args.prompt_batch)
    result: dict[str, Any] = bench_patching(model, batch, config, memory_batch=memory_batch)
    result.update(model=args.model, task=task.name, load_average=[list(load_before), list(os.getloadavg())],
                  cpu_count=os.cpu_count())
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _device(model: Any) -> Any:
    from patching.model_info import model_device

    return model_device(model)
