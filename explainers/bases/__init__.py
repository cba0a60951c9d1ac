"""Bases: sets of units read at one hook (neurons, heads, directions, SAE features); see :mod:`.base`."""

from __future__ import annotations

import os
from pathlib import Path

from explainers.bases.base import BASES, UnitBasis, read_saved, register_basis, to_residual
from explainers.bases.directions import DirectionBasis
from explainers.bases.features import FeatureBasis
from explainers.bases.heads import HeadBasis
from explainers.bases.neurons import NeuronBasis


def load_basis(path: str | os.PathLike, *, device: str = "cpu") -> UnitBasis:
    """A basis saved by ``basis.save(dir)``: an SAE directory (``cfg.json``, SAELens layout) or ``basis.json``."""
    p = Path(path)
    if (p / "cfg.json").is_file():
        return FeatureBasis.load(p, device=device)
    cfg, tensors = read_saved(p)
    kind = cfg.get("type")
    if kind not in BASES:
        raise ValueError(f"{p}/basis.json: basis type {kind!r} unknown; one of {', '.join(BASES)}")
    return BASES[kind].from_saved(cfg, tensors)


__all__ = ["BASES", "UnitBasis", "NeuronBasis", "HeadBasis", "DirectionBasis", "FeatureBasis", "load_basis",
           "register_basis", "to_residual"]
