"""Splice bases (neurons, directions, SAEs) into a model, with an error term.

``with splice(model, {hook: basis, ...}) as rec:`` routes the activation ``x`` at each hook through its basis:
``u = encode(x)``, ``x_hat = decode(u)``, ``err = x - x_hat`` and replaces ``x`` by

- ``error="keep"`` (default): ``decode(edit(u)) + err``. Without an edit this is ``x_hat + (x - x_hat) = x``,
  so the model's outputs are unchanged up to float rounding, while every unit and the error term are explicit
  (Marks et al. 2024, *Sparse Feature Circuits*: the error is a node of its own);
- ``error="drop"``: ``decode(edit(u))``, the SAE substituted for the activation (CE loss recovered);
- ``error="random"``: ``x + eps`` with ``eps`` a uniformly random direction of the same norm as ``err`` at each
  position: the control of Gurnee (2024), *SAE reconstruction errors are (empirically) pathological*, whose KL
  to the clean model is compared with that of the SAE reconstruction (``error_kl_ratio``). Seeded by ``seed``.

``edit`` maps a hook to a function of the unit activations (zero a feature, clamp it, steer), applied before
decoding; the error is always the unedited ``x - decode(u)``. ``mask`` (``Bool[B, P]``) limits the splice to
some positions (e.g. excluding BOS and padding); elsewhere ``x`` passes unchanged. The yielded
:class:`SpliceRecord` holds the last forward's unit activations and error terms per hook (not detached, so
gradients flow through them when the caller enables them).

Hooks are added with the bridge's own hook context and removed in ``finally``, also on errors.
For ``blocks.L.attn.hook_z`` (``[..., H, d_head]``) the basis sees the flattened ``[..., H * d_head]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from patching.basis import Basis, check_basis

ERROR_MODES = ("keep", "drop", "random")


@dataclass
class SpliceRecord:
    """What the last forward pass through a splice saw, per hook (shapes follow the hook, flattened for hook_z)."""

    units: dict[str, Tensor] = field(default_factory=dict)    # [..., n]
    errors: dict[str, Tensor] = field(default_factory=dict)   # [..., d]: x - decode(encode(x))
    calls: dict[str, int] = field(default_factory=dict)       # forward calls seen per hook


def _modes(error: str | Mapping[str, str], hooks: list[str]) -> dict[str, str]:
    modes = {h: error for h in hooks} if isinstance(error, str) else dict(error)
    for h in hooks:
        if h not in modes:
            raise ValueError(f"splice: no error mode given for hook {h!r}")
        if modes[h] not in ERROR_MODES:
            raise ValueError(f"splice: error mode {modes[h]!r} for {h!r} unknown; one of {ERROR_MODES}")
    return modes


@contextlib.contextmanager
def splice(model: Any, bases: Mapping[str, Basis], *, error: str | Mapping[str, str] = "keep",
           edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
           mask: Bool[Tensor, "B P"] | None = None, seed: int = 0, record: bool = True) -> Iterator[SpliceRecord]:
    """Route each hook's activations through its basis for the duration of the ``with`` block (module docstring).

    Args:
        model: a TransformerBridge (anything with ``hook_dict`` and ``hooks(fwd_hooks=...)``).
        bases: hook name -> basis (:class:`patching.basis.Basis`).
        error: ``"keep" | "drop" | "random"``, or one mode per hook.
        edit: hook -> function of the unit activations ``[..., n] -> [..., n]``.
        mask: positions to splice (``[B, P]``, True = splice), the same for every hook.
        seed: seeds the random errors of ``error="random"``.
        record: keep the last forward's unit activations and errors in the yielded record.
    """
    hooks = list(bases)
    if not hooks:
        raise ValueError("splice: no hooks given")
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(f"splice: expected a TransformerBridge, got {type(model).__name__}")
    for h in hooks:
        if h not in hook_dict:
            raise ValueError(f"splice: the model has no hook {h!r}")
        check_basis(bases[h], h)
        if getattr(bases[h], "decodable", True) is False:
            raise ValueError(f"splice: the basis at {h!r} ({type(bases[h]).__name__}) cannot decode, so it cannot "
                             "be spliced in")
    modes = _modes(error, hooks)
    edit = dict(edit or {})
    for h in edit:
        if h not in bases:
            raise ValueError(f"splice: edit given for {h!r}, which has no basis")
        if modes[h] == "random":
            raise ValueError(f"splice: edits and error='random' do not combine (hook {h!r})")
    rec = SpliceRecord()
    generators: dict[torch.device, torch.Generator] = {}

    def noise_like(x: Tensor) -> Tensor:
        g = generators.get(x.device)
        if g is None:
            g = generators[x.device] = torch.Generator(device=x.device).manual_seed(seed)
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def make(h: str) -> Callable[[Tensor, Any], Tensor]:
        basis, mode, fn = bases[h], modes[h], edit.get(h)

        def hook_fn(x: Tensor, hook: Any) -> Tensor:
            shape = x.shape
            d = basis.d_in
            if shape[-1] == d:
                flat = x
            elif x.dim() >= 2 and shape[-1] * shape[-2] == d:
                flat = x.reshape(*shape[:-2], d)
            else:
                raise ValueError(f"splice: hook {h!r} gives activations of shape {tuple(shape)}, the basis expects "
                                 f"a last dimension of {d}")
            w = basis.directions
            xin = flat.to(w.dtype)
            units = basis.encode(xin)
            x_hat = basis.decode(units)
            err = xin - x_hat
            if mode == "random":
                eps = noise_like(xin)
                eps = eps * (err.norm(dim=-1, keepdim=True) / eps.norm(dim=-1, keepdim=True).clamp_min(1e-30))
                out = xin + eps
            else:
                out = basis.decode(fn(units)) if fn is not None else x_hat
                if mode == "keep":
                    out = out + err
            if mask is not None:
                m = mask.to(out.device)
                if tuple(m.shape) != tuple(out.shape[:m.dim()]):
                    raise ValueError(f"splice: mask of shape {tuple(m.shape)} does not match the activations at "
                                     f"{h!r} of shape {tuple(shape)}")
                m = m.reshape(*m.shape, *([1] * (out.dim() - m.dim())))
                out = torch.where(m, out, xin)
            if record:
                rec.units[h] = units
                rec.errors[h] = err
            rec.calls[h] = rec.calls.get(h, 0) + 1
            return out.to(x.dtype).reshape(shape)

        return hook_fn

    fwd_hooks = [(h, make(h)) for h in hooks]
    with model.hooks(fwd_hooks=fwd_hooks):
        try:
            yield rec
        finally:
            generators.clear()
