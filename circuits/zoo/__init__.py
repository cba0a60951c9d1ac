"""The model zoo: small models trained here, with known mechanisms, shipped as HF-format checkpoints.

``RECIPES[name]`` holds each :class:`~circuits.zoo.recipes.Recipe`; :func:`~circuits.zoo.train.train`
reproduces a checkpoint; :func:`~circuits.zoo.check.check` re-measures the shipped one. Load a zoo model
with :func:`circuits.models.load_model` (``load_model("ioi-2l")``). All zoo models share one word-level
tokenizer (:mod:`circuits.zoo.tokenizer`).
"""

from __future__ import annotations

from circuits.zoo.paths import CHECKPOINTS, checkpoint_dir
from circuits.zoo.recipes import RECIPES, Figure, Recipe


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a one-line ``ValueError`` listing the zoo otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


__all__ = ["RECIPES", "Recipe", "Figure", "get_recipe", "checkpoint_dir", "CHECKPOINTS"]
