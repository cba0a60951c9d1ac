"""A faster ``ln(y) @ W + b`` for the projected q/k/v path, verified against the norm module itself.

The projected path (``patching/wiring.py``) recomputes ``ln1(x + delta_h) @ W[h] + b[h]`` for every
head of a receiver group: the norm runs on ``[K, R, B*P, d]`` tensors, the largest elementwise work
of an edge-patching forward. For the two common norms the scale factor is a per-row scalar, so

* RMSNorm ``y * rsqrt(mean(y^2) + eps) * w``:  ``ln(y) @ W = r * (y @ (w * W))`` with ``r`` from one fused
  ``vector_norm`` reduction;
* LayerNorm ``(y - mu) * rsqrt(var + eps) * w + c``: ``ln(y) @ W = r * (y @ W' - mu * 1^T W') + c @ W``
  with ``(var, mu)`` from one fused ``var_mean``,

which skips three full-size temporaries. :func:`fused_norm_projection` tries both forms and returns
the one that reproduces ``module(t) @ W + b`` on random inputs (relative error < 1e-5, or 8 eps in half
precision), or ``None``
(the caller then uses the module as it is): no class-name guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def _params(ln: Any, d: int, like: Tensor) -> tuple[Tensor, Tensor | None, float] | None:
    eps = getattr(ln, "variance_epsilon", None)
    if eps is None:
        eps = getattr(ln, "eps", None)
    if isinstance(eps, (tuple, list)) or eps is None:
        return None
    w = getattr(ln, "weight", None)
    w = torch.ones(d, dtype=like.dtype, device=like.device) if w is None else w.detach().to(like.dtype)
    c = getattr(ln, "bias", None)
    c = None if c is None else c.detach().to(like.dtype)
    if w.shape != (d,) or (c is not None and c.shape != (d,)):
        return None
    return w, c, float(eps)


def _rms(w: Tensor, eps: float, W: Tensor, b: Tensor | None) -> Projection:
    Wp = w[None, :, None] * W                                      # [R, d, dh]
    d = W.shape[1]

    def proj(y: Tensor) -> Tensor:                                 # y [..., R, rows, d]
        r = torch.rsqrt(torch.linalg.vector_norm(y, dim=-1, keepdim=True).square() / d + eps)
        out = torch.matmul(y, Wp) * r
        return out if b is None else out + b.unsqueeze(-2)
    return proj


def _layer(w: Tensor, c: Tensor | None, eps: float, W: Tensor, b: Tensor | None) -> Projection:
    Wp = w[None, :, None] * W                                      # [R, d, dh]
    col = Wp.sum(1).unsqueeze(-2)                                  # [R, 1, dh]
    const = 0 if c is None else torch.einsum("d,rde->re", c, W).unsqueeze(-2)
    if b is not None:
        const = const + b.unsqueeze(-2)

    def proj(y: Tensor) -> Tensor:
        var, mu = torch.var_mean(y, dim=-1, unbiased=False, keepdim=True)
        return (torch.matmul(y, Wp) - mu * col) * torch.rsqrt(var + eps) + const
    return proj


@torch.no_grad()
def fused_norm_projection(ln: Any, W: Tensor, b: Tensor | None) -> Projection | None:
    """``y [..., R, rows, d] -> ln(y) @ W + b  [..., R, rows, d_head]`` without the norm's temporaries,
    or ``None`` when neither the RMSNorm nor the LayerNorm form reproduces ``ln`` exactly."""
    d = W.shape[1]
    p = _params(ln, d, W)
    if p is None:
        return None
    w, c, eps = p
    g = torch.Generator(device="cpu").manual_seed(0)
    t = (torch.randn(W.shape[0], 7, d, generator=g) * 3 + 0.5).to(W)
    want = torch.matmul(ln(t), W) + (0 if b is None else b.unsqueeze(-2))
    tol = max(1e-5, 8 * torch.finfo(W.dtype).eps)  # half precision: the module's own rounding differs
    for cand in (_rms(w, eps, W, b), _layer(w, c, eps, W, b)):
        got = cand(t)
        if got.shape == want.shape and float((got - want).abs().max()) <= tol * float(want.abs().max()) + 1e-6:
            return cand
    return None


__all__ = ["fused_norm_projection"]
