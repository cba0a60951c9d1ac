"""Grouped-query attention (GQA), ungrouped so that every query head has its own key and value inputs.

In a GQA model (Ainslie et al. 2023) ``n_heads`` query heads share ``n_kv`` key/value heads: query head
``h`` reads key/value head ``h // g`` (``g = n_heads / n_kv``; HuggingFace's ``repeat_kv``). An edge
``a0.h1->a3.h2<k>`` must mean "head 2's keys", not "the keys of head 2's whole group", so the engine does
what auto-circuit (Miller et al. 2024) and TransformerLens' ``ungroup_grouped_query_attention`` do: for
the duration of an edge run it turns the model into the equivalent multi-head model, with the key and
value projections of each group repeated once per query head. The forward pass computes the same
numbers (each query head's private copy of its group's keys equals the shared one until an edge
patches it), and every per-head input hook (``hook_k`` / ``hook_v``, ``hook_k_input`` / ``hook_v_input``
with split q/k/v inputs) then has ``n_heads`` heads.

:func:`ungrouped` is a context manager that swaps each layer's ``k`` / ``v`` ``nn.Linear`` weight (and
bias) for the repeated one, sets the HF attention's ``num_key_value_groups`` to 1 and the bridge
configs' ``n_key_value_heads`` to ``n_heads``, and widens the ``hook_k`` / ``hook_v`` shape conversions;
everything is restored in ``finally``. It costs ``g`` times the k/v projection work, nothing else.
:func:`ungroup_reason` says (without side effects) why a model cannot be ungrouped, and
``patching.model_info.inspect_model`` checks on a tiny input that the ungrouped model reproduces the
grouped one before a graph gets edges.

Multi-GPU: the repeated weights are built on the device of the weight they replace.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def n_kv_heads(model: Any) -> int:
    """Key/value heads per layer (``n_heads`` for ordinary multi-head attention)."""
    n = getattr(model.cfg, "n_key_value_heads", None)
    return int(n) if n else int(model.cfg.n_heads)


def kv_groups(model: Any) -> int:
    """Query heads per key/value head (1 without GQA)."""
    return int(model.cfg.n_heads) // n_kv_heads(model)


def repeat_heads(t: Tensor, n_heads: int, dim: int = 0) -> Tensor:
    """Repeat each key/value head of ``t`` (heads along ``dim``) for the query heads of its group."""
    g = n_heads // t.shape[dim]
    return t if g == 1 else t.repeat_interleave(g, dim=dim)


def _linear(attn: Any, name: str) -> Any:
    return getattr(getattr(attn, name, None), "original_component", None)


def ungroup_reason(model: Any) -> str | None:
    """Why ``model``'s attention cannot be ungrouped (``None``: it can, or it has no GQA)."""
    H, kv = int(model.cfg.n_heads), n_kv_heads(model)
    if kv == H:
        return None
    if H % kv:
        return f"{H} query heads are not a multiple of {kv} k/v heads"
    for L, blk in enumerate(model.blocks):
        attn = blk._modules.get("attn")
        hf = getattr(attn, "original_component", None)
        if hf is None or not hasattr(hf, "num_key_value_groups"):
            return f"block {L}: attention without separate k/v heads to repeat (fused or unknown layout)"
        for name in ("k", "v"):
            lin = _linear(attn, name)
            if not isinstance(lin, nn.Linear) or lin.weight.shape[0] != kv * int(model.cfg.d_head):
                return f"block {L}: the {name} projection is not an nn.Linear of {kv} heads"
            conv = getattr(getattr(attn, name).hook_out, "hook_conversion", None)
            if conv is not None and not hasattr(conv, "n_heads"):
                return f"block {L}: unknown shape conversion on hook_{name}"
    return None


@contextmanager
def ungrouped(model: Any, enable: bool = True) -> Iterator[Any]:
    """Within the ``with``, ``model``'s GQA layers are the equivalent multi-head layers (module docstring).

    A no-op for models without GQA or with ``enable=False``. Raises ``ValueError`` naming the reason when
    the model cannot be ungrouped."""
    H = int(model.cfg.n_heads)
    if not enable or n_kv_heads(model) == H:
        yield model
        return
    reason = ungroup_reason(model)
    if reason:
        raise ValueError(f"cannot ungroup grouped-query attention: {reason}")
    undo: list[tuple[Any, str, Any]] = []  # (object, attribute, old value), restored in reverse

    def swap(obj: Any, attr: str, value: Any) -> None:
        undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        with torch.no_grad():
            for blk in model.blocks:
                attn = blk.attn
                for name in ("k", "v"):
                    lin = _linear(attn, name)
                    d_head = lin.weight.shape[0] // n_kv_heads(model)
                    w = repeat_heads(lin.weight.detach().view(-1, d_head, lin.weight.shape[1]), H).flatten(0, 1)
                    swap(lin, "weight", nn.Parameter(w, requires_grad=False))
                    if lin.bias is not None:
                        b = repeat_heads(lin.bias.detach().view(-1, d_head), H).flatten()
                        swap(lin, "bias", nn.Parameter(b, requires_grad=False))
                    conv = getattr(getattr(attn, name).hook_out, "hook_conversion", None)
                    if conv is not None:
                        swap(conv, "n_heads", H)
                swap(attn.original_component, "num_key_value_groups", 1)
                if getattr(attn, "config", None) is not None and getattr(attn.config, "n_key_value_heads", None):
                    swap(attn.config, "n_key_value_heads", H)
        swap(model.cfg, "n_key_value_heads", H)
        yield model
    finally:
        for obj, attr, old in reversed(undo):
            setattr(obj, attr, old)


__all__ = ["ungrouped", "ungroup_reason", "n_kv_heads", "kv_groups", "repeat_heads"]
