"""Re-measure a zoo model's figures from its checkpoint and compare them with the recipe's thresholds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from circuits.zoo.measure import EVAL_SEED, MEASURES
from circuits.zoo.recipes import Recipe


def check_dir(recipe: Recipe, directory: str | Path, device: str | None = None,
              seed: int = EVAL_SEED) -> dict[str, Any]:
    """Load ``directory`` as a bridge, measure ``recipe``'s figures and compare with the thresholds.

    Returns ``{"name", "passed", "figures": {name: value}, "checks": [{name, value, threshold,
    higher_is_better, passed}], "seconds"}`` (figures include per-head extras where measured).
    """
    from circuits.models import load_model, load_tokenizer

    t0 = time.perf_counter()
    model = load_model(str(directory), device=device)
    tokenizer = load_tokenizer(str(directory))
    figures = MEASURES[recipe.measure](model, tokenizer, seed=seed)
    checks = []
    for f in recipe.figures:
        if f.name not in figures:
            raise ValueError(f"zoo {recipe.name}: measure {recipe.measure!r} did not report figure {f.name!r}")
        checks.append({"name": f.name, "value": figures[f.name], "threshold": f.threshold,
                       "higher_is_better": f.higher_is_better, "passed": f.passes(figures[f.name])})
    return {"name": recipe.name, "passed": all(c["passed"] for c in checks),
            "figures": {k: round(v, 6) for k, v in figures.items()}, "checks": checks,
            "seconds": round(time.perf_counter() - t0, 2)}


def check(name: str, device: str | None = None, seed: int = EVAL_SEED) -> dict[str, Any]:
    """:func:`check_dir` on the shipped checkpoint of zoo model ``name``."""
    from circuits.zoo import get_recipe
    from circuits.zoo.paths import checkpoint_dir

    recipe = get_recipe(name)
    d = checkpoint_dir(name)
    if not (d / "config.json").is_file():
        raise ValueError(f"zoo model {name!r} has no checkpoint in {d}; run `circuitexplain zoo train {name}`")
    return check_dir(recipe, d, device=device, seed=seed)
