"""``circuitexplain sae collect | train | metrics``: the activation store, SAE training and SAE metrics.

Registered through the entry point ``sae = "evals.cli_sae:register"``. Lives in ``evals`` because it composes
``circuits`` (models, task generators for the default corpus) with ``explainers`` (store, SAEs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG_COLLECT = """\
corpora (--corpus):
  task:NAME          the zoo task generator NAME (ioi, induction, greater_than, dyck), prompts with their answers,
                     generated in chunks of 1000 with seeds derived from --seed (default for zoo models)
  fortunes           Debian's fortunes (apt-get install fortunes): offline English text (default for smollm2-135m)
  FILE.txt[#unit]    a text file; unit = paragraph (default), line or file
  FILE.jsonl[#field] one JSON object per line, field (default text) a string or a list of token ids
  hf:NAME[:SPLIT[:FIELD]]  a HuggingFace dataset, streamed (needs a reachable hub and the datasets package)

examples:
  circuitexplain sae collect --model ioi-2l --hooks blocks.1.hook_resid_pre --tokens 200000 --out out/store-ioi
  circuitexplain sae collect --model smollm2-135m --hooks blocks.15.hook_resid_post --corpus fortunes \\
      --tokens 500000 --out out/store-smollm2-l15
"""

EPILOG_TRAIN = """\
architectures (--arch) and their sparsity setting:
  relu-l1    ReLU, L1 penalty weighted by decoder norms        --l1 (default 5.0)
  topk       TopK activation, AuxK loss for dead latents       --k  (required)
  batchtopk  top k*B over the batch; JumpReLU at inference     --k  (required)
  jumprelu   learned thresholds, L0 penalty with STEs          --l0 (default 0.1)
centring (--centring):
  none       no pre-encoder bias and no decoder bias: a truly zero-centred SAE
  learned    b_dec subtracted before encoding and added after decoding, trained (init: geometric median)
  mean       the fixed data mean subtracted before encoding and added after decoding
width (--width): a number of latents, or a multiple of the hook's dimension (8x).

Without --store, activations are collected first into OUT/store (same options as `sae collect`).
The last --holdout of the store's shards are held out for the metrics. Writes OUT/cfg.json and
OUT/sae_weights.safetensors (SAELens layout), OUT/training.json, OUT/metrics.json, OUT/density.png.
A killed run resumes from OUT/checkpoint.pt when rerun with the same options.

examples:
  circuitexplain sae train --model ioi-2l --hook blocks.1.hook_resid_pre --arch topk --k 16 \\
      --centring mean --width 4x --tokens 200000 --out out/sae-ioi-topk
  circuitexplain sae train --model smollm2-135m --hook blocks.15.hook_resid_post --arch jumprelu \\
      --centring learned --width 4x --store out/store-smollm2-l15 --train-tokens 400000 --out out/sae-smol
"""


def _add_collect_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--corpus", help="corpus (see below; default: the zoo model's task, fortunes for pretrained models)")
    p.add_argument("--tokens", type=int, required=required, default=None if required else 200_000,
                   help="activations to collect: tokens, BOS and padding excluded" +
                        ("" if required else " (default 200000)"))
    p.add_argument("--seq-len", type=int, default=128, help="tokens per context, BOS included (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default 16)")
    p.add_argument("--shard-batches", type=int, default=8, help="forward batches per shard (default 8)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="stored activation dtype (default float32)")
    p.add_argument("--no-prepend-bos", action="store_true", help="do not start contexts with BOS")
    p.add_argument("--include-bos", action="store_true", help="store the BOS position too")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("sae", help="activation store, SAE training and metrics",
                                  description="Collect activations, train sparse autoencoders, measure them.")
    group.set_defaults(_group_parser=group)
    sub = group.add_subparsers(dest="sae_command", metavar="COMMAND")

    p = sub.add_parser("collect", help="collect activations at some hooks into a sharded store",
                       description="Run the model over a corpus and store the activations at the given hooks "
                                   "(safetensors shards + manifest.json; resumable; see docs/store.md).",
                       epilog=EPILOG_COLLECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name, pretrained name (smollm2-135m), HF dir or hub name")
    p.add_argument("--hooks", required=True, help="comma-separated TransformerLens hook names")
    p.add_argument("--out", required=True, type=Path, help="store directory")
    _add_collect_args(p, required=True)
    _add_common(p)
    p.set_defaults(func=collect_handler)

    p = sub.add_parser("train", help="train an SAE (relu-l1, topk, batchtopk, jumprelu) and measure it",
                       description="Train a sparse autoencoder on one hook's activations (collected first unless "
                                   "--store is given), save it in SAELens' layout and write its metrics "
                                   "(docs/saes.md).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name, pretrained name (smollm2-135m), HF dir or hub name")
    p.add_argument("--hook", required=True, help="TransformerLens hook name (e.g. blocks.1.hook_resid_pre)")
    p.add_argument("--arch", required=True, choices=("relu-l1", "topk", "batchtopk", "jumprelu"))
    p.add_argument("--centring", required=True, choices=("none", "learned", "mean"))
    p.add_argument("--width", required=True, help="latents: a number or a multiple of d_in (8x)")
    p.add_argument("--out", required=True, type=Path, help="output directory (the SAE, metrics, checkpoint)")
    p.add_argument("--store", type=Path, help="an existing activation store holding --hook")
    _add_collect_args(p, required=False)
    p.add_argument("--k", type=int, help="topk / batchtopk: active latents per token")
    p.add_argument("--l1", type=float, default=5.0, help="relu-l1 sparsity coefficient (default 5.0)")
    p.add_argument("--l0", type=float, default=0.1, help="jumprelu L0 coefficient (default 0.1)")
    p.add_argument("--train-tokens", type=int, help="training tokens (default: 3 epochs of the training split)")
    p.add_argument("--train-batch", type=int, default=4096, help="SAE batch size in tokens (default 4096)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--dead-tokens", type=int, default=1_000_000,
                   help="a latent is dead after this many tokens without firing (default 1e6, capped at a fifth "
                        "of the training tokens)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the store's shards held out (default 0.1)")
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    _add_common(p)
    p.set_defaults(func=train_handler)

    p = sub.add_parser("metrics", help="(re)compute an SAE's metrics on a store's held-out shards",
                       description="Write DIR/metrics.json and DIR/density.png for the SAE in DIR (formulas in "
                                   "docs/saes.md).")
    p.add_argument("sae", type=Path, help="SAE directory (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", required=True, help="the model the SAE reads")
    p.add_argument("--store", required=True, type=Path, help="activation store holding the SAE's hook")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the store's shards held out (default 0.1)")
    p.add_argument("--ce-contexts", type=int, default=64, help="held-out contexts for CE and KL (default 64)")
    _add_common(p)
    p.set_defaults(func=metrics_handler)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed (corpus generation, shuffling, initialisation)")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class TaskCorpus:
    """A zoo task generator as an endless corpus: prompts with their answers, generated 1000 at a time with seeds
    ``seed * 1_000_003 + chunk`` (for the model's tokenizer when it is not the zoo's)."""

    CHUNK = 1000

    def __init__(self, task: str, seed: int, tokenizer: Any | None) -> None:
        from circuits.tasks import TASKS

        if task not in TASKS:
            raise ValueError(f"task corpus {task!r} unknown; one of {', '.join(TASKS)}")
        self.task, self.seed, self.tokenizer = task, seed, tokenizer
        self.name = f"task:{task}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "task", "name": self.name, "task": self.task, "seed": self.seed, "chunk": self.CHUNK,
                "document": "clean prompt + answer"}

    def __iter__(self):
        from circuits.tasks import get_task

        chunk = 0
        while True:
            t = get_task(self.task, n=self.CHUNK, seed=self.seed * 1_000_003 + chunk, tokenizer=self.tokenizer)
            for pair in t.pairs:
                yield pair.clean + pair.answer
            chunk += 1


def build_corpus(spec: str | None, model_name: str, tokenizer: Any, seed: int) -> Any:
    """The corpus for ``--corpus`` (default: the zoo model's task; ``fortunes`` for other models)."""
    from circuits.zoo import RECIPES
    from explainers.corpus import corpus_from_spec

    if spec is None:
        if model_name in RECIPES:
            spec = f"task:{RECIPES[model_name].data}"
        else:
            spec = "fortunes"
    if spec.startswith("task:"):
        zoo = model_name in RECIPES
        return TaskCorpus(spec[5:], seed, None if zoo else tokenizer)
    return corpus_from_spec(spec)


def _store_config(args: argparse.Namespace, hooks: tuple[str, ...]) -> Any:
    from explainers.store import StoreConfig

    return StoreConfig(model=args.model, hooks=hooks, n_tokens=args.tokens, seq_len=args.seq_len,
                       batch_size=args.batch_size, shard_batches=args.shard_batches, dtype=args.dtype,
                       prepend_bos=not args.no_prepend_bos, exclude_bos=not args.include_bos)


def _setup(args: argparse.Namespace) -> Any:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from circuits.models import load_model

    return load_model(args.model, device=args.device)


def collect_handler(args: argparse.Namespace) -> int:
    import time

    from explainers.store import collect

    hooks = tuple(h.strip() for h in args.hooks.split(",") if h.strip())
    cfg = _store_config(args, hooks)           # validated before the model loads
    early = None if (args.corpus or "task:").startswith("task:") else build_corpus(args.corpus, args.model, None, 0)
    model = _setup(args)
    corpus = early or build_corpus(args.corpus, args.model, model.tokenizer, args.seed)
    t = time.perf_counter()
    store = collect(model, corpus, cfg, args.out, progress=not args.no_progress)
    dt = time.perf_counter() - t
    print(f"{store.n_rows} tokens x {len(hooks)} hook(s) in {store.n_shards} shards: {args.out} ({dt:.1f} s)")
    return 0


def _width(spec: str, d_in: int) -> int:
    try:
        w = int(round(float(spec[:-1]) * d_in)) if spec.endswith("x") else int(spec)
    except ValueError:
        raise ValueError(f"--width {spec!r}: expected a number of latents or a multiple like 8x") from None
    if w < 1:
        raise ValueError(f"--width {spec!r} gives {w} latents")
    return w


def train_handler(args: argparse.Namespace) -> int:
    from evals.sae_metrics import evaluate_sae
    from explainers.sae import StoreSource, TrainConfig, train_sae
    from explainers.store import ActivationStore, collect

    if args.arch in ("topk", "batchtopk") and args.k is None:
        raise ValueError(f"--arch {args.arch} needs --k")
    if args.arch not in ("topk", "batchtopk") and args.k is not None:
        raise ValueError(f"--k applies to topk and batchtopk, not {args.arch}")
    if not 0 < args.holdout < 1:
        raise ValueError(f"--holdout must be in (0, 1), got {args.holdout}")
    _width(args.width, 1)
    if args.store is None:
        _store_config(args, (args.hook,))
    model = _setup(args)
    if args.store is not None:
        store = ActivationStore(args.store)
        store.d(args.hook)
    else:
        corpus = build_corpus(args.corpus, args.model, model.tokenizer, args.seed)
        store = collect(model, corpus, _store_config(args, (args.hook,)), args.out / "store",
                        progress=not args.no_progress)
    train_shards, _ = store.split(args.holdout)
    source = StoreSource(store, args.hook, train_shards, buffer_shards=64)
    d_in = store.d(args.hook)
    width = _width(args.width, d_in)
    train_tokens = args.train_tokens or 3 * source.n_rows
    cfg = TrainConfig(arch=args.arch, centring=args.centring, width=width, k=args.k, l1_coefficient=args.l1,
                      l0_coefficient=args.l0, train_tokens=train_tokens,
                      batch_size=min(args.train_batch, source.n_rows), lr=args.lr, dead_tokens=args.dead_tokens,
                      seed=args.seed)
    s = store.config
    meta = {"context_size": s.seq_len, "prepend_bos": s.prepend_bos,
            "dataset_path": store.manifest["settings"]["corpus"].get("name", "")}
    sae = train_sae(source, cfg, args.out, hook=args.hook, model=args.model, metadata=meta,
                    device=args.device or _default_device(), progress=not args.no_progress,
                    checkpoint_every=args.checkpoint_every)
    print(f"SAE {args.arch}/{args.centring}, {width} latents at {args.hook}: {args.out}")
    if not args.no_metrics:
        m = evaluate_sae(model, sae.to(next(model.parameters()).device), store, args.hook, holdout=args.holdout,
                         seed=args.seed, out_dir=args.out)
        _print_metrics(m, args.out)
    return 0


def metrics_handler(args: argparse.Namespace) -> int:
    from evals.sae_metrics import evaluate_sae
    from explainers.sae import load_sae
    from explainers.store import ActivationStore

    store = ActivationStore(args.store)
    sae = load_sae(args.sae)
    hook = sae.cfg.hook
    if not hook:
        raise ValueError(f"{args.sae}/cfg.json names no hook (metadata.hook_name)")
    store.d(hook)
    model = _setup(args)
    m = evaluate_sae(model, sae.to(next(model.parameters()).device), store, hook, holdout=args.holdout,
                     ce_contexts=args.ce_contexts, seed=args.seed, out_dir=args.sae)
    _print_metrics(m, args.sae)
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _print_metrics(m: dict[str, Any], out: Path) -> None:
    keys = ("explained_variance", "mse", "l0", "dead_fraction", "ce_loss_recovered", "error_linear_r2",
            "error_kl_ratio", "mean_error_data_cos")
    print(json.dumps({k: round(float(m[k]), 5) for k in keys}))
    print(f"wrote {out / 'metrics.json'} and {out / 'density.png'}", file=sys.stderr)
