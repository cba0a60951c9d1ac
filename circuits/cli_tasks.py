"""``circuitexplain tasks``: list the task generators and show a task's prompt pairs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TASKS_HELP = """\
Tasks are clean/corrupted prompt pairs with a single-token answer and a wrong token, scored by a metric
(logit_diff by default). Built-in generators are deterministic given --seed; any other task can be
given as a JSON Lines file, one object per line:
  {"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}      (optional "metric")
Clean and corrupt must tokenize to the same length; answer and wrong must be single tokens.
With --model, generators write their prompts for that model's tokenizer (words that are one token in it,
pairs of equal token length; greater_than on digit-by-digit tokenizers asks for the tens digit), and task
files are validated against it.
"""


def cmd_list(args: argparse.Namespace) -> int:
    from circuits.tasks import TASKS, describe

    rows = [{"name": n, "metric": TASKS[n](n=1, seed=0).metric, "description": describe(n)} for n in TASKS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<14} {r['metric']:<11} {r['description']}")
    return 0


def _model_view(task: Any, model_name: str, shown: int) -> list[dict[str, Any]]:
    import torch

    from circuits.models import load_model
    from circuits.tasks import validate
    from patching.metrics import gather_pos, get_metric

    model = load_model(model_name, device=None)
    tok = model.tokenizer
    validate(task, tok)
    batch = task.batch(tok, model.cfg.device)[:shown]
    with torch.no_grad():
        clean = gather_pos(model(batch.clean), batch.pos)
        corrupt = gather_pos(model(batch.corrupt), batch.pos)
    metric = get_metric(task.metric, clean_logits=clean)
    mc, mk = metric(clean, batch), metric(corrupt, batch)
    out = []
    for i in range(len(batch)):
        n = int(batch.pos[i]) + 1
        out.append({"tokens": tok.convert_ids_to_tokens(batch.clean[i, :n].tolist()),
                    "top_clean": tok.convert_ids_to_tokens([int(clean[i].argmax())])[0],
                    "top_corrupt": tok.convert_ids_to_tokens([int(corrupt[i].argmax())])[0],
                    f"{task.metric}_clean": float(mc[i]), f"{task.metric}_corrupt": float(mk[i])})
    return out


def cmd_show(args: argparse.Namespace) -> int:
    from circuits.models import load_tokenizer
    from circuits.tasks import get_task

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    tokenizer = load_tokenizer(args.model) if args.model else None
    task = get_task(args.name, n=args.n, seed=args.seed, metric=args.metric, tokenizer=tokenizer)
    shown = min(args.n, len(task))
    views = _model_view(task, args.model, shown) if args.model else [{}] * shown
    rows = [{"where": task.where(i), **task.pairs[i].to_dict(), **views[i]} for i in range(shown)]
    if args.json:
        print(json.dumps({"name": task.name, "metric": task.metric, "source": task.source,
                          "n_pairs": len(task), "pairs": rows}, indent=2))
        return 0
    print(f"task {task.name}: {len(task)} pairs, metric {task.metric}, source {task.source}")
    for r in rows:
        print(f"[{r['where']}]")
        print(f"  clean:   {r['clean']!r}")
        print(f"  corrupt: {r['corrupt']!r}")
        print(f"  answer:  {r['answer']!r}   wrong: {r['wrong']!r}")
        if args.model:
            print(f"  tokens:  {' '.join(r['tokens'])}")
            print(f"  model:   top clean {r['top_clean']!r}, top corrupt {r['top_corrupt']!r}, "
                  f"{task.metric} clean {r[task.metric + '_clean']:.3f} corrupt {r[task.metric + '_corrupt']:.3f}")
    if args.model and rows:
        key = task.metric
        mean_c = sum(r[key + "_clean"] for r in rows) / len(rows)
        mean_k = sum(r[key + "_corrupt"] for r in rows) / len(rows)
        print(f"mean {key} over {len(rows)} pairs: clean {mean_c:.4f}, corrupt {mean_k:.4f}")
    return 0


def register(subparsers: Any) -> None:
    from circuits.tasks import TASKS
    from patching.metrics import METRICS

    p = subparsers.add_parser("tasks", help="list task generators and show prompt pairs",
                              description=TASKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_group_parser=p)
    sub = p.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND")

    q = sub.add_parser("list", help="list the built-in task generators",
                       description="List the built-in task generators with their default metric.")
    q.add_argument("--json", action="store_true", help="print a JSON list")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("show", help="print a task's prompt pairs (optionally as a model sees them)",
                       description="Print the first N prompt pairs of a generated task or a .jsonl task file. "
                                   "With --model, also check that the task tokenizes for that model (equal "
                                   "clean/corrupt lengths, single-token answers, known words), show the tokens, "
                                   "the model's top prediction and the metric on the clean and corrupted prompt.")
    q.add_argument("name", metavar="TASK", help=f"generator ({', '.join(TASKS)}) or a .jsonl file")
    q.add_argument("--model", metavar="M", help="zoo name, pretrained name (smollm2-135m), local HF directory or "
                                                "hub name: prompts are generated for its tokenizer")
    q.add_argument("-n", type=int, default=5, metavar="N", help="number of pairs to generate and show (default 5)")
    q.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    q.add_argument("--metric", choices=sorted(METRICS), help="override the task's metric")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_show)


if __name__ == "__main__":  # pragma: no cover
    from circuits.cli import main

    sys.exit(main(["tasks", *sys.argv[1:]]))
