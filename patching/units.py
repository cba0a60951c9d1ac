"""Stable ids for units: one neuron, head, activation direction or SAE feature of one model (the one parser).

A unit is (model, hook, basis, index). Its **short id** is the project's component vocabulary
(docs/architecture.md), so circuit graphs, explanations and steering all name it the same way:

=============  ===================================  ============================================
kind           short id                             hook
=============  ===================================  ============================================
neuron         ``m{L}.n{I}``                        ``blocks.L.mlp.hook_post``
head           ``a{L}.h{H}``                        ``blocks.L.attn.hook_z``
feature        ``f{L}.{I}@{hook-short}``            any block hook (an SAE's site)
direction      ``d{L}.{I}@{hook-short}``            any block hook (PCA / difference of means)
error          ``err@{hook-short}``                 the reconstruction error of a spliced basis
=============  ===================================  ============================================

``hook-short`` is the TransformerLens hook name without the ``blocks.`` prefix and the ``hook_`` of its last
component: ``blocks.3.hook_resid_pre`` -> ``3.resid_pre``, ``blocks.3.mlp.hook_post`` -> ``3.mlp.post``,
``blocks.0.attn.hook_z`` -> ``0.attn.z``; :func:`hook_short` and :func:`hook_long` are inverse. ``L`` in
``f{L}``/``d{L}`` is the hook's block and must agree with it (``f3.17@3.resid_post``); two SAEs at one hook
are told apart by the basis name in the full id.

The **full id** adds model and basis: ``{model}:{basis}:{short}``, e.g. ``ioi-2l:topk-512:f1.17@1.resid_post``
(either may be empty: ``ioi-2l::m0.n5``). :func:`parse_unit_id` is the one parser of both forms; the neuron and
head id formats are those of their unit kinds (:mod:`patching.kinds`, whose :func:`~patching.kinds.parse_node_id`
reads every component id). This module lives in ``patching`` so the engine can use it; ``explainers.units``
re-exports it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from patching.kinds import AttnHeadKind, NeuronKind

KINDS = ("neuron", "head", "feature", "direction", "error")
#: The hook every neuron / head unit is read at (``{L}`` = layer).
NEURON_HOOK = "blocks.{L}.mlp.hook_post"
HEAD_HOOK = "blocks.{L}.attn.hook_z"

_NEURON = re.compile(f"^{NeuronKind.pattern}$")  # m{L}.n{I}
_HEAD = re.compile(f"^{AttnHeadKind.pattern}$")  # a{L}.h{H}
_SITE = re.compile(r"^([fd])(\d+)\.(\d+)@(.+)$")
_ERROR = re.compile(r"^err@(.+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-/]*$")


def hook_short(hook: str) -> str:
    """``blocks.3.hook_resid_pre`` -> ``3.resid_pre``; ``ln_final.hook_in`` -> ``ln_final.in``."""
    parts = hook.split(".")
    if not parts[-1].startswith("hook_") or len(parts[-1]) == len("hook_"):
        raise ValueError(f"{hook!r} is not a TransformerLens hook name (its last part must start with 'hook_')")
    parts[-1] = parts[-1][len("hook_"):]
    if parts[0] == "blocks":
        if len(parts) < 3 or not parts[1].isdigit():
            raise ValueError(f"{hook!r}: a block hook must read blocks.<layer>....hook_<name>")
        parts = parts[1:]
    return ".".join(parts)


def hook_long(short: str) -> str:
    """Inverse of :func:`hook_short`: ``3.mlp.post`` -> ``blocks.3.mlp.hook_post``."""
    parts = short.split(".")
    if not short or any(p == "" for p in parts):
        raise ValueError(f"{short!r} is not a short hook name (e.g. 3.resid_post)")
    parts[-1] = "hook_" + parts[-1]
    if parts[0].isdigit():
        if len(parts) < 2:
            raise ValueError(f"{short!r} is not a short hook name (e.g. 3.resid_post)")
        parts = ["blocks", *parts]
    return ".".join(parts)


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to (``blocks.3.…`` -> 3), ``None`` for hooks outside the blocks."""
    parts = hook.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass(frozen=True)
class UnitId:
    """One unit: ``kind`` in :data:`KINDS`, its block ``layer``, ``index`` within the basis (``None`` for an
    error node), the ``hook`` it is read at, the ``basis`` name and the ``model`` name (both may be empty)."""

    kind: str
    layer: int
    index: int | None
    hook: str
    basis: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unit kind {self.kind!r} unknown; one of {KINDS}")
        if self.kind == "error":
            if self.index is not None:
                raise ValueError("an error unit has no index")
        elif self.index is None or self.index < 0:
            raise ValueError(f"{self.kind} unit needs an index >= 0, got {self.index}")
        if self.layer < 0:
            raise ValueError(f"unit layer must be >= 0, got {self.layer}")
        expected = {"neuron": NEURON_HOOK, "head": HEAD_HOOK}.get(self.kind)
        if expected is not None and self.hook != expected.format(L=self.layer):
            raise ValueError(f"{self.kind} units of layer {self.layer} are read at {expected.format(L=self.layer)}, "
                             f"not {self.hook!r}")
        if expected is None:
            if hook_layer(self.hook) != self.layer:
                raise ValueError(f"{self.kind} unit of layer {self.layer} at hook {self.hook!r}: the hook must be "
                                 f"in block {self.layer} (blocks.{self.layer}.…)")
            hook_short(self.hook)  # validates the name
        for what, v in (("basis", self.basis), ("model", self.model)):
            if ":" in v or not _NAME.match(v):
                raise ValueError(f"unit {what} name {v!r} may use letters, digits and _ . - / only")

    @property
    def short(self) -> str:
        """The id in the component vocabulary (``m0.n5``, ``a1.h2``, ``f1.17@1.resid_post``, ``err@1.resid_post``)."""
        if self.kind == "neuron":
            return f"m{self.layer}.n{self.index}"
        if self.kind == "head":
            return f"a{self.layer}.h{self.index}"
        if self.kind == "error":
            return f"err@{hook_short(self.hook)}"
        return f"{self.kind[0]}{self.layer}.{self.index}@{hook_short(self.hook)}"

    @property
    def full(self) -> str:
        """``{model}:{basis}:{short}``."""
        return f"{self.model}:{self.basis}:{self.short}"

    def __str__(self) -> str:
        return self.full if (self.model or self.basis) else self.short

    def with_context(self, *, model: str | None = None, basis: str | None = None) -> UnitId:
        return UnitId(self.kind, self.layer, self.index, self.hook, self.basis if basis is None else basis,
                      self.model if model is None else model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitId:
        return cls(**d)


def parse_unit_id(s: str) -> UnitId:
    """Parse a short id (``m0.n5``) or a full id (``ioi-2l:topk-512:f1.17@1.resid_post``) into a :class:`UnitId`.

    Raises a one-line ``ValueError`` naming the id and what is wrong with it.
    """
    if not isinstance(s, str) or not s:
        raise ValueError(f"unit id must be a non-empty string, got {s!r}")
    model = basis = ""
    short = s
    if ":" in s:
        parts = s.rsplit(":", 2)
        if len(parts) != 3:
            raise ValueError(f"unit id {s!r}: a full id reads model:basis:short (e.g. ioi-2l::m0.n5)")
        model, basis, short = parts
    try:
        if m := _NEURON.match(short):
            L, i = int(m[1]), int(m[2])
            return UnitId("neuron", L, i, NEURON_HOOK.format(L=L), basis, model)
        if m := _HEAD.match(short):
            L, i = int(m[1]), int(m[2])
            return UnitId("head", L, i, HEAD_HOOK.format(L=L), basis, model)
        if m := _SITE.match(short):
            kind = "feature" if m[1] == "f" else "direction"
            return UnitId(kind, int(m[2]), int(m[3]), hook_long(m[4]), basis, model)
        if m := _ERROR.match(short):
            hook = hook_long(m[1])
            layer = hook_layer(hook)
            if layer is None:
                raise ValueError(f"error node hook {hook!r} is not a block hook")
            return UnitId("error", layer, None, hook, basis, model)
    except ValueError as e:
        raise ValueError(f"unit id {s!r}: {e}") from None
    raise ValueError(f"unit id {s!r} not understood: expected m{{L}}.n{{I}}, a{{L}}.h{{H}}, f{{L}}.{{I}}@{{hook}}, "
                     f"d{{L}}.{{I}}@{{hook}} or err@{{hook}}, optionally prefixed by model:basis:")


__all__ = ["KINDS", "NEURON_HOOK", "HEAD_HOOK", "UnitId", "parse_unit_id", "hook_short", "hook_long", "hook_layer"]
