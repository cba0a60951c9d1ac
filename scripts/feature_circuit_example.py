"""Reproduce the feature-circuit example of docs/levels.md (issue #12, items 4-5): train small SAEs with the
project's own tools, discover the IOI feature circuit on ``ioi-2l`` and ``smollm2-135m``, export it (HTML viewer,
Neuronpedia JSON) and compare faithfulness at the feature, neuron and node levels.

Every stage is one ``circuitexplain`` command (printed before it runs, so the log is the recipe); each command is
resumable or skipped when its output exists, so rerunning the script after a crash redoes nothing finished.

Stages (``--stages``, default all, in this order):

* ``saes``     ``sae collect`` once per model (all hooks in one pass), then ``sae train`` per hook; the SAEs go
               to ``$CIRCUITEXPLAIN_CACHE/saes/feature-example/MODEL/`` (default ``~/.cache/circuitexplain``),
               never into git;
* ``discover`` ``discover --level feature`` on each model -> ``docs/results/features/MODEL-ioi-features.json``;
* ``export``   that graph's in-circuit part as HTML and Neuronpedia JSON next to it;
* ``levels``   ``eval circuits --level feature,neuron,node`` -> ``docs/results/features/MODEL-levels/``.

Usage::

    python scripts/feature_circuit_example.py                    # everything, both models
    python scripts/feature_circuit_example.py --models ioi-2l --stages saes
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "features"


@dataclass(frozen=True)
class Recipe:
    """The SAEs and the circuit settings of one model."""

    model: str
    hooks: tuple[str, ...]
    corpus: str | None       # None: the CLI's default (the zoo task for zoo models)
    tokens: int
    seq_len: int
    width: str
    k: int
    centring: str
    lr: float
    train_tokens: int
    n_prompts: int
    ig_steps: int = 3
    method: str = "eap-ig"


RECIPES = {
    "ioi-2l": Recipe(
        model="ioi-2l",
        hooks=("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
               "blocks.1.hook_resid_post"),
        corpus=None, tokens=60_000, seq_len=32, width="4x", k=16, centring="mean", lr=1e-3,
        train_tokens=200_000, n_prompts=64),
    "smollm2-135m": Recipe(
        model="smollm2-135m",
        hooks=("blocks.10.hook_resid_post", "blocks.18.hook_resid_post", "blocks.24.hook_resid_post"),
        corpus="fortunes", tokens=30_000, seq_len=128, width="4x", k=32, centring="learned", lr=1e-3,
        train_tokens=120_000, n_prompts=24, method="eap"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CIRCUITEXPLAIN_CACHE", Path.home() / ".cache" / "circuitexplain"))


def sae_root(model: str) -> Path:
    return cache_dir() / "saes" / "feature-example" / model


def sae_dir(model: str, hook: str) -> Path:
    return sae_root(model) / hook.replace("blocks.", "").replace("hook_", "").replace(".", "-")


def run(cmd: list[str], log: Path) -> None:
    """Run one CLI command, echoing it and appending it to ``log`` (the recipe as actually run)."""
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {line}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run_parallel(cmds: list[list[str]], log: Path) -> None:
    """Run independent CLI commands at once (logged like :func:`run`); fail if any fails."""
    procs = []
    for cmd in cmds:
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"$ {line} &", flush=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(line + " &\n")
        procs.append(subprocess.Popen(cmd, cwd=ROOT))
    bad = [cmd for cmd, p in zip(cmds, procs, strict=True) if p.wait() != 0]
    if bad:
        raise SystemExit(f"{len(bad)} command(s) failed, first: {' '.join(bad[0][:8])} ...")


PARALLEL = False


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("circuitexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "circuits.cli"]


def stage_saes(r: Recipe, log: Path, threads: int) -> None:
    store = sae_root(r.model) / "store"
    if not (store / "manifest.json").exists() or '"complete": true' not in (store / "manifest.json").read_text():
        cmd = [*cli(), "sae", "collect", "--model", r.model, "--hooks", ",".join(r.hooks), "--tokens",
               str(r.tokens), "--seq-len", str(r.seq_len), "--out", str(store), "--threads", str(threads)]
        if r.corpus:
            cmd += ["--corpus", r.corpus]
        run(cmd, log)
    todo = []
    for hook in r.hooks:
        out = sae_dir(r.model, hook)
        if (out / "metrics.json").exists():
            continue
        todo.append([*cli(), "sae", "train", "--model", r.model, "--hook", hook, "--store", str(store), "--arch",
                     "topk", "--k", str(r.k), "--centring", r.centring, "--width", r.width, "--lr", str(r.lr),
                     "--train-tokens", str(r.train_tokens), "--out", str(out), "--threads",
                     str(1 if PARALLEL else threads), "--no-progress"])
    if PARALLEL and len(todo) > 1:  # one process per SAE, one thread each
        run_parallel(todo, log)
    else:
        for cmd in todo:
            run(cmd, log)


def sae_arg(r: Recipe) -> str:
    return ",".join(str(sae_dir(r.model, h)) for h in r.hooks)


def stage_discover(r: Recipe, log: Path, threads: int) -> None:
    out = RESULTS / f"{r.model}-ioi-features.json"
    if out.exists():
        return
    run([*cli(), "discover", "--model", r.model, "--task", "ioi", "--level", "feature", "--sae", sae_arg(r),
         "--method", r.method, *(["--ig-steps", str(r.ig_steps)] if r.method == "eap-ig" else []), "-n",
         str(r.n_prompts), "--eval-prompts", str(r.n_prompts // 2), "--out", str(out), "--json"], log)


def stage_export(r: Recipe, log: Path, threads: int) -> None:
    src = RESULTS / f"{r.model}-ioi-features.json"
    for suffix in (".html", ".np.json"):
        run([*cli(), "export", str(src), "--in-circuit-only", "--out",
             str(src.with_name(src.name.replace(".json", suffix)))], log)


def stage_levels(r: Recipe, log: Path, threads: int) -> None:
    """The three levels with every active feature a unit; then the feature level alone with Marks et al.'s
    candidate set (the 64 most active features per site, the others clean), the one ``discover`` uses."""
    if not (RESULTS / f"{r.model}-levels" / "results.json").exists():
        run([*cli(), "eval", "circuits", "--model", r.model, "--task", "ioi", "--level", "feature,neuron,node",
             "--sae", sae_arg(r), "-n", str(r.n_prompts), "--out", str(RESULTS / f"{r.model}-levels")], log)
    if not (RESULTS / f"{r.model}-levels-64" / "results.json").exists():
        run([*cli(), "eval", "circuits", "--model", r.model, "--task", "ioi", "--level", "feature",
             "--max-features-per-site", "64", "--sae", sae_arg(r), "-n", str(r.n_prompts), "--out",
             str(RESULTS / f"{r.model}-levels-64")], log)


STAGES = {"saes": stage_saes, "discover": stage_discover, "export": stage_export, "levels": stage_levels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the SAE commands (default 2)")
    p.add_argument("--parallel", action="store_true", help="train a model's SAEs at once (one thread each)")
    args = p.parse_args(argv)
    global PARALLEL
    PARALLEL = args.parallel
    models = [m for m in args.models.split(",") if m]
    stages = [s for s in args.stages.split(",") if s]
    for name in models + stages:
        if name not in RECIPES and name not in STAGES:
            p.error(f"unknown model or stage {name!r}")
    log = RESULTS / "commands.txt"
    for m in models:
        for s in stages:
            STAGES[s](RECIPES[m], log, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
