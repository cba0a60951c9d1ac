"""Stable ids for units: one neuron, head, activation direction or SAE feature of one model.

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
(either may be empty: ``ioi-2l::m0.n5``). :func:`parse_unit_id` is the one parser of both forms.

The code lives in :mod:`patching.units` (the engine uses it and may not import ``explainers``); this module
re-exports it.
"""

from __future__ import annotations

from patching.units import (
    HEAD_HOOK,
    KINDS,
    NEURON_HOOK,
    UnitId,
    hook_layer,
    hook_long,
    hook_short,
    parse_unit_id,
)

__all__ = ["KINDS", "NEURON_HOOK", "HEAD_HOOK", "UnitId", "parse_unit_id", "hook_short", "hook_long", "hook_layer"]
