"""Ablation values: what an ablated unit outputs instead of its activation.

Computed for every sender group at once, in the unit form of ``patching/wiring.py`` (``[B | 1, P | 1, n, f]``,
broadcast over the batch), by an :class:`Ablator` that serves every prompt batch of one engine call:

* ``zero``: zeros (Olsson et al. 2022 style zero ablation; a zero-ablated head outputs nothing,
  the attention output bias ``b_O`` stays).
* ``mean``: the mean activation over the *real* tokens of the reference prompts (the clean prompts when no
  reference batch is given), over all of them at once, whatever the prompt batches: positions up to ``pos``
  (padding never counts) and, by default, not the BOS token. On real models the BOS position carries
  activations far from every other token's (an attention sink; Xiao et al. 2024), so a mean that includes
  it is dominated by it; ``include_bos=True`` restores the old mean over every real position. A BOS token
  is recognised by its id (the tokenizer's ``bos_token_id``; no id, no exclusion). ``per_position=True``
  averages over prompts only, separately at each position (Wang et al. 2022's positional mean); position 0
  is then BOS in every prompt and its "mean" is BOS's own activation, so nothing is excluded there.
* ``resample``: the activation on the corrupted prompt of the same row (Chan et al. 2022's
  resample ablation / activation patching from the corrupted run).

Means are accumulated in float32 whatever the model's dtype. Registry: :data:`ABLATIONS` lists the names.
"""

from __future__ import annotations

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


def bos_token_id(model: Any) -> int | None:
    """The BOS token id of ``model``'s tokenizer (``None`` without a tokenizer or a BOS token)."""
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None)
    return None if bos is None else int(bos)


def mean_weights(batch: TaskBatch, *, bos: int | None = None, per_position: bool = False) -> Bool[Tensor, "B P"]:
    """The positions a mean ablation averages over: real tokens, without BOS tokens unless ``per_position``."""
    valid = valid_positions(batch)
    if bos is not None and not per_position:
        valid = valid & (batch.clean != bos)
    return valid


class Ablator:
    """Ablated values of every sender group, for each prompt batch of one engine call.

    ``fit(parts)`` sees the clean activations of every prompt batch first (a mean over the clean prompts needs
    all of them; a mean over ``reference`` captures it, ``prompt_batch`` prompts per forward); then
    ``values(batch, clean)`` gives one prompt batch's ablated activations. Both return the forwards they ran.
    Call under ``torch.no_grad()`` inside :func:`patching.wiring.prepared`.
    """

    def __init__(self, wiring: Wiring, ablation: str, *, reference: TaskBatch | None = None,
                 per_position: bool = False, bos: int | None = None, include_bos: bool = False,
                 prompt_batch: int | None = None):
        self.wiring, self.ablation = wiring, check_ablation(ablation)
        self.reference, self.per_position = reference, per_position
        self.bos = None if include_bos else bos
        self.prompt_batch = prompt_batch
        self._means: dict[str, Tensor] = {}

    def fit(self, parts: list[tuple[TaskBatch, dict[str, Tensor]]]) -> int:
        if self.ablation != "mean":
            return 0
        runs = 0
        sums: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}

        def add(batch: TaskBatch, store: dict[str, Tensor]) -> None:
            w = mean_weights(batch, bos=self.bos, per_position=self.per_position).float()
            w = w.view(*w.shape, 1, 1)
            for k, u in store.items():
                u = u.expand(w.shape[0], *u.shape[1:]) if u.shape[0] != w.shape[0] else u
                wk = w.to(u.device)
                s = (u.float() * wk).sum(0, keepdim=True)
                c = wk.sum(0, keepdim=True)
                if not self.per_position:
                    s, c = s.sum(1, keepdim=True), c.sum(1, keepdim=True)
                if k in sums and sums[k].shape[1] < s.shape[1]:  # prompt batches of different lengths
                    pad = s.shape[1] - sums[k].shape[1]
                    sums[k] = torch.nn.functional.pad(sums[k], (0, 0, 0, 0, 0, pad))
                    counts[k] = torch.nn.functional.pad(counts[k], (0, 0, 0, 0, 0, pad))
                if k in sums:
                    n = s.shape[1]
                    sums[k][:, :n] += s
                    counts[k][:, :n] += c
                else:
                    sums[k], counts[k] = s, c

        if self.reference is None:
            for batch, store in parts:
                add(batch, store)
        else:
            ref = self.reference.to(self.wiring.device)
            size = self.prompt_batch or len(ref)
            for i in range(0, len(ref), size):
                sub = trimmed(ref[i:i + size])
                _, store = self.wiring.capture(sub.clean, logits=False)
                runs += 1
                add(sub, store)
        if not sums:
            raise ValueError("mean ablation: no real tokens to average over (every position is padding or BOS)")
        dtype = self.wiring.dtype
        self._means = {k: (sums[k] / counts[k].clamp_min(1)).to(dtype) for k in sums}
        self._ref_positions = max(v.shape[1] for v in sums.values())
        return runs

    def values(self, batch: TaskBatch, clean: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        if self.ablation == "zero":
            return {k: torch.zeros_like(v[:1, :1]) for k, v in clean.items()}, 0
        if self.ablation == "resample":
            _, store = self.wiring.capture(batch.corrupt, logits=False)
            return store, 1
        if not self._means:
            raise RuntimeError("Ablator.values: call fit() first for mean ablation")
        p = batch.clean.shape[1]
        if not self.per_position:
            return dict(self._means), 0
        if self._ref_positions < p:
            raise ValueError(f"mean ablation per position: reference prompts have {self._ref_positions} positions, "
                             f"the batch has {p}")
        return {k: v[:, :p] for k, v in self._means.items()}, 0


def trimmed(batch: TaskBatch) -> TaskBatch:
    """``batch`` without the trailing positions no row reads (right padding after the last ``pos``)."""
    if not len(batch):
        return batch
    P = int(batch.pos.max()) + 1
    if P == batch.clean.shape[1]:
        return batch
    return TaskBatch(batch.clean[:, :P], batch.corrupt[:, :P], batch.answer, batch.wrong, batch.pos)


ABLATIONS = ("zero", "mean", "resample")


def check_ablation(ablation: str, where: str = "ablation") -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"{where}: unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
    return ablation


def ablation_values(wiring: Wiring, batch: TaskBatch, clean: dict[str, Tensor], ablation: str, *,
                    reference: TaskBatch | None = None, per_position: bool = False, bos: int | None = None,
                    include_bos: bool = False) -> tuple[dict[str, Tensor], int]:
    """Ablated unit-form activations of every sender group for one batch, and the number of forwards it ran.

    ``clean`` is the capture of ``batch.clean`` (unit form per sender group); ``bos`` the BOS token id a mean
    leaves out (``None``: none). Call under ``torch.no_grad()`` inside :func:`patching.wiring.prepared`.
    """
    ab = Ablator(wiring, ablation, reference=reference, per_position=per_position, bos=bos, include_bos=include_bos)
    runs = ab.fit([(batch, clean)])
    values, more = ab.values(batch, clean)
    return values, runs + more


__all__ = ["ABLATIONS", "Ablator", "ablation_values", "valid_positions", "mean_weights", "bos_token_id",
           "check_ablation", "trimmed"]
