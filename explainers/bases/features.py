"""SAE features as units: ``f{L}.{I}@{hook-short}`` (Bricken et al. 2023; Cunningham et al. 2023).

A thin basis over :class:`explainers.sae.SAE`: ``encode`` / ``decode`` are the SAE's (``decode`` affine:
``f @ W_dec + b_dec``), a feature's direction is its decoder row ``W_dec[i]`` in the hook's space and its write
direction into the residual stream is that row mapped through :func:`explainers.bases.base.to_residual` (the
row itself for residual-stream SAEs). Saved in SAELens' layout (:mod:`explainers.sae.io`); the basis name
defaults to the SAE directory's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from explainers.bases.base import UnitBasis, register_basis
from explainers.sae.io import load_sae, save_sae
from explainers.sae.model import SAE


@register_basis("features")
class FeatureBasis(UnitBasis):
    kind = "feature"

    def __init__(self, sae: SAE, *, hook: str | None = None, model: str | None = None, name: str = "") -> None:
        hook = hook or sae.cfg.hook
        if not hook:
            raise ValueError("FeatureBasis: the SAE records no hook; pass hook=")
        super().__init__(hook, model=sae.cfg.model if model is None else model, name=name)
        self.sae = sae

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None, device: str = "cpu") -> FeatureBasis:
        p = Path(path)
        return cls(load_sae(p, device), name=p.resolve().name if name is None else name)

    @property
    def n_units(self) -> int:
        return self.sae.cfg.d_sae

    @property
    def d_in(self) -> int:
        return self.sae.cfg.d_in

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return self.sae.encode(acts)

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return self.sae.decode(units)

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        return self.sae.W_dec

    @property
    def bias(self) -> Float[Tensor, " d"]:
        return self.sae.b_dec

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.sae.cfg.to_dict()}

    def save(self, path: str | os.PathLike) -> Path:
        return save_sae(self.sae, path)
