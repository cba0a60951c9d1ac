"""Stable ids for units: one neuron, head, activation direction or SAE feature of one model.

The short and full id formats, ``hook_short`` / ``hook_long`` and :func:`parse_unit_id` (the one parser of both)
are documented and implemented in :mod:`patching.units` (the engine uses them and may not import
``explainers``); this module re-exports them for the explainers.
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
