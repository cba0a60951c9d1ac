"""Activation directions as units: ``d{L}.{I}@{hook-short}``.

A direction basis is affine: ``encode(x) = (x - center) @ W_enc``, ``decode(u) = u @ W_dec + center`` with
``W_enc`` the pseudo-inverse of ``W_dec``, so ``decode(encode(x))`` is the orthogonal projection of ``x - center``
onto the span of the directions (plus ``center``) and the error term of a splice is what lies outside it.
Constructors:

- :meth:`DirectionBasis.pca`: the top principal components of activations (unit rows, ``center`` = the mean;
  ``stats["explained_variance_ratio"]`` per component). Signs are fixed (largest entry positive).
- :meth:`DirectionBasis.diff_means`: the difference of means of a contrastive set, ``mean(pos) - mean(neg)``
  (the "counterbalanced" steering vector of ActAdd / CAA), ``center`` = the midpoint of the two means, so the
  unit reads +0.5 at the positive mean and -0.5 at the negative mean.
- :meth:`DirectionBasis.mean_centred`: Jorgensen et al. 2023, *Improving Activation Steering in Language
  Models with Mean-Centring*: for each target set, ``mean(target) - mean(background)`` with the background the
  model's ordinary activations (e.g. the activation store); ``center`` = the background mean, so a target's mean
  encodes to 1 on its own direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explainers.bases.base import UnitBasis, register_basis

METHODS = ("pca", "diff-means", "mean-centred")


def _as_rows(x: Tensor, what: str) -> Tensor:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: expected activations [N, d] with N >= 1, got shape {tuple(x.shape)}")
    return x.detach().double()


@register_basis("directions")
class DirectionBasis(UnitBasis):
    kind = "direction"

    def __init__(self, hook: str, W_dec: Float[Tensor, "n d"], center: Float[Tensor, " d"], *,
                 W_enc: Float[Tensor, "d n"] | None = None, method: str = "pca", labels: Sequence[str] = (),
                 stats: Mapping[str, Any] | None = None, model: str = "", name: str = "") -> None:
        super().__init__(hook, model=model, name=name)
        if method not in METHODS:
            raise ValueError(f"DirectionBasis: method {method!r} unknown; one of {METHODS}")
        if W_dec.dim() != 2 or center.shape != (W_dec.shape[1],):
            raise ValueError(f"DirectionBasis: W_dec must be [n, d] and center [d]; got {tuple(W_dec.shape)} and "
                             f"{tuple(center.shape)}")
        if labels and len(labels) != W_dec.shape[0]:
            raise ValueError(f"DirectionBasis: {len(labels)} labels for {W_dec.shape[0]} directions")
        self.W_dec = W_dec.detach().float().contiguous()
        self.center = center.detach().float().contiguous()
        self.W_enc = (torch.linalg.pinv(W_dec.detach().double()).float() if W_enc is None
                      else W_enc.detach().float()).contiguous()
        self.method = method
        self.labels = tuple(labels)
        self.stats = dict(stats or {})

    # -- constructors --------------------------------------------------------------------------------------
    @classmethod
    def pca(cls, acts: Float[Tensor, "N d"], n: int, hook: str, *, model: str = "", name: str = "") -> DirectionBasis:
        """The top ``n`` principal components of ``acts`` (eigenvectors of the covariance, float64)."""
        x = _as_rows(acts, "DirectionBasis.pca")
        if not 1 <= n <= x.shape[1]:
            raise ValueError(f"DirectionBasis.pca: n must be in 1..{x.shape[1]}, got {n}")
        if x.shape[0] < 2:
            raise ValueError("DirectionBasis.pca: needs at least 2 activation rows")
        mu = x.mean(0)
        xc = x - mu
        cov = xc.T @ xc / (x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[:n]
        V = evecs[:, order].T                                            # [n, d], unit rows
        sign = torch.sign(V.gather(1, V.abs().argmax(dim=1, keepdim=True)))
        V = V * sign
        total = evals.clamp_min(0).sum()
        ratio = (evals[order].clamp_min(0) / total).tolist() if total > 0 else [0.0] * n
        return cls(hook, V, mu, W_enc=V.T, method="pca", stats={"explained_variance_ratio": ratio,
                                                                "n_rows": int(x.shape[0])}, model=model, name=name)

    @classmethod
    def diff_means(cls, positive: Float[Tensor, "N1 d"], negative: Float[Tensor, "N2 d"], hook: str, *,
                   label: str = "", model: str = "", name: str = "") -> DirectionBasis:
        """One direction ``mean(positive) - mean(negative)``; center the midpoint (module docstring)."""
        p, q = _as_rows(positive, "diff_means positive"), _as_rows(negative, "diff_means negative")
        if p.shape[1] != q.shape[1]:
            raise ValueError(f"diff_means: positive and negative activations differ in size ({p.shape[1]} vs "
                             f"{q.shape[1]})")
        mp, mq = p.mean(0), q.mean(0)
        d = mp - mq
        if float(d.norm()) == 0.0:
            raise ValueError("diff_means: the two sets have the same mean; the direction is undefined")
        return cls(hook, d[None], (mp + mq) / 2, method="diff-means", labels=(label,) if label else (),
                   stats={"n_positive": int(p.shape[0]), "n_negative": int(q.shape[0]), "norm": float(d.norm())},
                   model=model, name=name)

    @classmethod
    def mean_centred(cls, targets: Mapping[str, Float[Tensor, "N d"]], background: Float[Tensor, "M d"],
                     hook: str, *, model: str = "", name: str = "") -> DirectionBasis:
        """One direction per target set: ``mean(target) - mean(background)`` (Jorgensen et al. 2023)."""
        if not targets:
            raise ValueError("mean_centred: no target sets given")
        bg = _as_rows(background, "mean_centred background").mean(0)
        rows, labels, sizes = [], [], {}
        for label, acts in targets.items():
            t = _as_rows(acts, f"mean_centred target {label!r}")
            if t.shape[1] != bg.shape[0]:
                raise ValueError(f"mean_centred: target {label!r} has size {t.shape[1]}, background {bg.shape[0]}")
            rows.append(t.mean(0) - bg)
            labels.append(str(label))
            sizes[str(label)] = int(t.shape[0])
        W = torch.stack(rows)
        if torch.linalg.matrix_rank(W) < W.shape[0]:
            raise ValueError("mean_centred: the target directions are linearly dependent")
        return cls(hook, W, bg, method="mean-centred", labels=labels,
                   stats={"n_background": int(background.shape[0]), "n_target": sizes}, model=model, name=name)

    # -- protocol ------------------------------------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return (acts.to(self.W_enc.dtype) - self.center) @ self.W_enc

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        return self.W_dec

    @property
    def bias(self) -> Float[Tensor, " d"]:
        return self.center

    def to(self, device: str | torch.device) -> DirectionBasis:
        self.W_dec, self.W_enc, self.center = (t.to(device) for t in (self.W_dec, self.W_enc, self.center))
        return self

    # -- storage -------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": self.method, "labels": list(self.labels), "stats": self.stats}

    def tensors(self) -> dict[str, Tensor]:
        return {"W_dec": self.W_dec, "W_enc": self.W_enc, "center": self.center}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> DirectionBasis:
        return cls(config["hook"], tensors["W_dec"], tensors["center"], W_enc=tensors["W_enc"],
                   method=config["method"], labels=config.get("labels", ()), stats=config.get("stats"),
                   model=config.get("model", ""), name=config.get("name", ""))
