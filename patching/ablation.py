"""Ablation values: what an ablated unit outputs instead of its activation.

Computed once per batch for every sender group at the same time (one capture forward at most), in
the unit form of ``patching/wiring.py`` (``[B | 1, P | 1, n, f]``, broadcast over the batch):

* ``zero``: zeros (Olsson et al. 2022 style zero ablation; a zero-ablated head outputs nothing,
  the attention output bias ``b_O`` stays).
* ``mean``: the mean activation over the real (non-pad: position <= ``pos``) tokens of the reference
  prompts (the clean prompts when no reference batch is given); ``per_position=True`` averages over
  prompts only, separately at each position (Wang et al. 2022's "mean over the reference
  distribution", positional variant).
* ``resample``: the activation on the corrupted prompt of the same row (Chan et al. 2022's
  resample ablation / activation patching from the corrupted run).

Registry: :data:`ABLATIONS` maps a name to its function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from patching.batch import TaskBatch
from patching.wiring import Wiring


def valid_positions(batch: TaskBatch) -> Bool[Tensor, "B P"]:
    """True at the real tokens of each row (positions up to ``pos``; right padding after)."""
    p = batch.clean.shape[1]
    return torch.arange(p, device=batch.pos.device).unsqueeze(0) <= batch.pos.unsqueeze(1)


def _zero(wiring: Wiring, batch: TaskBatch, clean: dict[str, Tensor], **_: Any) -> tuple[dict[str, Tensor], int]:
    return {k: torch.zeros_like(v[:1, :1]) for k, v in clean.items()}, 0


def _resample(wiring: Wiring, batch: TaskBatch, clean: dict[str, Tensor], **_: Any) -> tuple[dict[str, Tensor], int]:
    _, store = wiring.capture(batch.corrupt)
    return store, 1


def _mean(wiring: Wiring, batch: TaskBatch, clean: dict[str, Tensor], *, reference: TaskBatch | None = None,
          per_position: bool = False, **_: Any) -> tuple[dict[str, Tensor], int]:
    runs = 0
    if reference is None:
        src, store = batch, clean
    else:
        src = reference.to(batch.device)
        _, store = wiring.capture(src.clean)
        runs = 1
    p = batch.clean.shape[1]
    if per_position and src.clean.shape[1] < p:
        raise ValueError(f"mean ablation per position: reference prompts have {src.clean.shape[1]} positions, "
                         f"the batch has {p}")
    valid = valid_positions(src)
    out = {}
    for k, u in store.items():
        w = valid.to(u.dtype).view(*valid.shape, 1, 1)
        if u.shape[0] != w.shape[0]:  # broadcast activations (e.g. a [1, P, d] position embedding)
            u = u.expand(w.shape[0], *u.shape[1:])
        if per_position:
            m = (u * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1)
            out[k] = m[:, :p]
        else:
            out[k] = ((u * w).sum((0, 1), keepdim=True) / w.sum((0, 1), keepdim=True).clamp_min(1))
    return out, runs


AblationFn = Callable[..., tuple[dict[str, Tensor], int]]
ABLATIONS: dict[str, AblationFn] = {"zero": _zero, "mean": _mean, "resample": _resample}


def check_ablation(ablation: str, where: str = "ablation") -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"{where}: unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
    return ablation


def ablation_values(wiring: Wiring, batch: TaskBatch, clean: dict[str, Tensor], ablation: str, *,
                    reference: TaskBatch | None = None, per_position: bool = False) -> tuple[dict[str, Tensor], int]:
    """Ablated unit-form activations of every sender group, and the number of forwards it ran.

    ``clean`` is the capture of ``batch.clean`` (unit form per sender group). Call under
    ``torch.no_grad()`` inside :func:`patching.wiring.prepared`.
    """
    check_ablation(ablation)
    return ABLATIONS[ablation](wiring, batch, clean, reference=reference, per_position=per_position)


__all__ = ["ABLATIONS", "ablation_values", "valid_positions", "check_ablation"]
