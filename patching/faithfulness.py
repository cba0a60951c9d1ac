"""Faithfulness of a circuit: the one definition that discovery, budgets, greedy pruning and the evaluation use.

For a metric ``m`` averaged over the prompts::

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

* ``m(C)``: every unit outside the circuit ``C`` ablated (edges: every edge not in ``C``; nodes: every
  ablatable node not in ``C``; the embeddings and the logits are part of every node circuit);
* ``m(full)``: nothing ablated, the clean run (the patchers' ``clean_metric``);
* ``m(empty)``: *everything* ablated, the embeddings included: every edge for an
  :class:`~patching.exact.EdgePatcher`, every node but the logits (``NodePatcher.ablatable``) for a
  :class:`~patching.exact.NodePatcher`. Both are the engine's fully ablated run (its ``ablated_metric``;
  under resample ablation, the corrupted prompts' forward), so ``f`` is comparable between edge and node
  circuits and ``f(empty) = 0``, ``f(full) = 1`` exactly.

``f`` is undefined when ``|m(full) - m(empty)| <= 1e-12 * max(1, |m(full)|)`` (the clean and ablated runs do
not differ on the metric): :func:`faithfulness` raises :class:`FaithfulnessUndefined`, a ``ValueError`` with a
one-line message; callers that only report ``f`` catch it and leave the number out.

Means are taken in float64 (``mean_metric``), whatever the model's dtype.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from jaxtyping import Bool
from torch import Tensor

REL_TOL = 1e-12

T = TypeVar("T", float, Tensor)


class FaithfulnessUndefined(ValueError):
    """``m(full) == m(empty)``: the faithfulness ratio has no denominator."""


def is_defined(m_full: float, m_empty: float) -> bool:
    """Whether ``f`` has a denominator: ``|m_full - m_empty| > 1e-12 * max(1, |m_full|)``."""
    return abs(m_full - m_empty) > REL_TOL * max(1.0, abs(m_full))


def faithfulness(m_circuit: T, m_full: float, m_empty: float, *, metric: str = "metric") -> T:
    """``(m_circuit - m_empty) / (m_full - m_empty)`` for a float or a tensor of circuit metrics.

    Raises :class:`FaithfulnessUndefined` (one line, naming ``metric``) when the denominator vanishes.
    """
    m_full, m_empty = float(m_full), float(m_empty)
    if not is_defined(m_full, m_empty):
        raise FaithfulnessUndefined(
            f"faithfulness undefined: the full model and the empty circuit give the same mean {metric} "
            f"({m_full:.6g}); the clean and ablated runs must differ on this metric")
    return (m_circuit - m_empty) / (m_full - m_empty)


def mean_metric(values: Tensor) -> Tensor:
    """Mean over the last (prompt) dimension, in float64."""
    return values.detach().double().mean(-1)


def full_and_empty(patcher: Any) -> tuple[float, float]:
    """``(m(full), m(empty))`` of an engine patcher: its clean and fully ablated runs, averaged in float64."""
    return float(mean_metric(patcher.clean_metric).cpu()), float(mean_metric(patcher.ablated_metric).cpu())


def empty_mask(patcher: Any) -> Bool[Tensor, " U"]:
    """The ablation mask of the empty circuit for ``patcher``: every edge, or every node but the logits."""
    ablatable = getattr(patcher, "ablatable", None)
    if ablatable is not None:  # NodePatcher
        return ablatable.detach().clone()
    return torch.ones(patcher.graph.n_edges, dtype=torch.bool, device=patcher.clean_metric.device)


def patcher_faithfulness(patcher: Any, m_circuit: T, *, metric: str | None = None) -> T:
    """:func:`faithfulness` of circuit metrics measured with ``patcher`` (its own full / empty runs)."""
    full, empty = full_and_empty(patcher)
    return faithfulness(m_circuit, full, empty, metric=metric or getattr(patcher, "metric_name", "metric"))


__all__ = ["REL_TOL", "FaithfulnessUndefined", "is_defined", "faithfulness", "mean_metric", "full_and_empty",
           "empty_mask", "patcher_faithfulness"]
