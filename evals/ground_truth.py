"""Ground-truth recovery: ROC curves and AUC of a method's scores against a reference circuit.

Each unit (edge or node) is a positive when it is in the reference circuit. Sweeping a threshold ``t`` down
over the ranking key (``|score|`` by default) and keeping the units with key ``>= t`` gives one ROC point
``(FPR, TPR)`` per distinct key value, from ``(0, 0)`` to ``(1, 1)``; tied units enter together (a
diagonal segment). The AUC is the trapezoid area under these points, which equals the Mann-Whitney
statistic ``P(key(pos) > key(neg)) + P(key(pos) == key(neg)) / 2`` exactly.

This is the exact ROC over every threshold; MIB (Mueller et al. 2025) samples it at its ten circuit sizes
on InterpBench (Gupta et al. 2024) instead. The ranking is the result's own
(:meth:`circuits.algorithms.DiscoveryResult.importance`: ``|score|`` for methods whose scores are per-unit
effects, the removal order for greedy).

Methods that return circuits rather than scores (ACDC) get Conmy et al.'s (2023) ROC instead
(:func:`roc_from_circuits`): one (FPR, TPR) point per circuit of a threshold sweep, plus (0, 0) and (1, 1);
points dominated by another (lower FPR and higher TPR) are discarded, and the AUC is the area under the
staircase through the rest, each TPR gain counted from its own FPR on (their ``pessimistic_auc``:
``sum_i (1 - fpr_i) * (tpr_i - tpr_{i-1})``).

Levels:

* edge: every edge of the engine's graph, its score the method's edge score (edge-level methods only);
* node: the internal nodes (heads, MLPs, neurons, blocks; ``embed``, ``pos_embed`` and ``logits`` are
  part of every circuit, so they are no prediction), scored by the method's node score for node-level
  methods and by ``max |score|`` over the node's incoming and outgoing edges for edge-level methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from circuits.convert import owner_node
from evals.references import ReferenceCircuit, edge_endpoints

IO_NODES = ("embed", "pos_embed", "logits")


@dataclass(frozen=True)
class ROC:
    """An ROC curve: ``fpr``/``tpr`` points (from 0 to 1) at the decreasing ``thresholds`` (the first is
    ``+inf``: nothing kept), its ``auc``, and the numbers of positives and negatives."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]
    auc: float
    n_pos: int
    n_neg: int
    level: str = "edge"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("fpr", "tpr", "thresholds"):
            d[k] = [x if math.isfinite(x) else ("inf" if x > 0 else "-inf") for x in d[k]]
        return d


def roc_curve(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, *,
              absolute: bool = True, level: str = "edge") -> ROC:
    """The exact ROC of ranking units by ``|scores|`` (or ``scores`` with ``absolute=False``) against
    ``labels`` (module docstring). NaN scores rank last. Raises ``ValueError`` without positives or
    negatives."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"roc_curve: {s.shape[0]} scores but {y.shape[0]} labels")
    key = np.abs(s) if absolute else s.copy()
    key[np.isnan(key)] = -np.inf
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_curve ({level}): need positives and negatives, got {n_pos} positives and "
                         f"{n_neg} negatives")
    order = np.argsort(-key, kind="stable")
    key, y = key[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.nonzero(key[1:] != key[:-1])[0], key.shape[0] - 1]  # last index of each tie group
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr = np.r_[0.0, fp[last] / n_neg]
    auc = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))
    thresholds = np.r_[np.inf, key[last]]
    return ROC(fpr=tuple(fpr.tolist()), tpr=tuple(tpr.tolist()), thresholds=tuple(thresholds.tolist()), auc=auc,
               n_pos=n_pos, n_neg=n_neg, level=level)


def pessimistic_auc(fpr: Sequence[float], tpr: Sequence[float]) -> float:
    """Conmy et al.'s AUC of ROC points: sort by (fpr, tpr), ``sum_i (1 - fpr_i) (tpr_i - tpr_{i-1})``."""
    order = np.lexsort((np.asarray(tpr, dtype=np.float64), np.asarray(fpr, dtype=np.float64)))
    x = np.asarray(fpr, dtype=np.float64)[order]
    y = np.asarray(tpr, dtype=np.float64)[order]
    dy = np.diff(y)
    if np.any(dy < -1e-12):
        raise ValueError("pessimistic_auc: the points are not monotone (discard dominated points first)")
    return float(np.sum((1.0 - x[1:]) * dy))


def pareto_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ROC points no other point dominates (another with lower FPR and higher TPR), sorted, distinct."""
    pts = sorted(set(points))
    return [(x, y) for x, y in pts if not any(x1 < x and y1 > y for x1, y1 in pts)]


def roc_from_circuits(circuits: Sequence[Sequence[bool]] | np.ndarray, labels: Sequence[bool] | np.ndarray, *,
                      level: str = "edge") -> ROC:
    """Conmy et al.'s ROC of a sweep of circuits (module docstring): ``circuits [T, U]`` membership per unit,
    ``labels [U]`` the reference. ``thresholds`` holds the index of the circuit behind each point (``-1`` for
    the added end points)."""
    c = np.asarray(circuits, dtype=bool)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if c.ndim != 2 or c.shape[1] != y.shape[0]:
        raise ValueError(f"roc_from_circuits: circuits of shape {c.shape} for {y.shape[0]} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_from_circuits ({level}): need positives and negatives, got {n_pos} positives and "
                         f"{n_neg} negatives")
    pts = {(0.0, 0.0): -1, (1.0, 1.0): -1}
    for i, row in enumerate(c):
        pt = (float((row & ~y).sum() / n_neg), float((row & y).sum() / n_pos))
        pts.setdefault(pt, i)
    kept = pareto_points(list(pts))
    auc = pessimistic_auc([x for x, _ in kept], [t for _, t in kept])
    return ROC(fpr=tuple(x for x, _ in kept), tpr=tuple(t for _, t in kept),
               thresholds=tuple(float(pts[p]) for p in kept), auc=auc, n_pos=n_pos, n_neg=n_neg, level=level)


def sweep_rocs(graph: Any, circuits: Any, reference: ReferenceCircuit) -> dict[str, ROC]:
    """``{"edge", "node"}`` Conmy-style ROCs of edge circuits ``[T, E]`` (a node is in a circuit when one of its
    edges is; the inputs and the logits are left out as in :func:`node_roc`)."""
    c = np.asarray(circuits, dtype=bool)
    edge_ids = [e.id for e in graph.edges]
    missing = sorted(set(reference.edges) - set(edge_ids))
    if missing:
        raise ValueError(f"sweep_rocs: reference edge {missing[0]!r} is not among the graph's edges")
    ref = set(reference.edges)
    out = {"edge": roc_from_circuits(c, [e in ref for e in edge_ids], level="edge")}
    internal = [n.id for n in graph.nodes if n.id not in IO_NODES]
    col = {n: i for i, n in enumerate(internal)}
    nodes = np.zeros((c.shape[0], len(internal)), dtype=bool)
    for j, e in enumerate(graph.edges):
        for n in (e.sender, e.receiver):
            if n in col:
                nodes[:, col[n]] |= c[:, j]
    out["node"] = roc_from_circuits(nodes, [n in set(reference.nodes) for n in internal], level="node")
    return out


def edge_roc(edge_ids: Sequence[str], edge_scores: Sequence[float] | np.ndarray, reference: ReferenceCircuit,
             *, absolute: bool = True) -> ROC:
    """ROC over the graph's edges; every reference edge must be among ``edge_ids``."""
    ids = list(edge_ids)
    missing = sorted(set(reference.edges) - set(ids))
    if missing:
        raise ValueError(f"edge_roc: reference edge {missing[0]!r} is not among the scored edges")
    ref = set(reference.edges)
    return roc_curve(edge_scores, [e in ref for e in ids], absolute=absolute, level="edge")


def node_scores_from_edges(edge_ids: Sequence[str], edge_scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``max |score|`` over each node's incoming and outgoing edges (NaN scores ignored)."""
    out: dict[str, float] = {}
    for e, v in zip(edge_ids, np.asarray(edge_scores, dtype=np.float64).tolist(), strict=True):
        a = abs(v) if not math.isnan(v) else -math.inf
        for n in edge_endpoints(e):
            out[n] = max(out.get(n, -math.inf), a)
    return out


def node_roc(node_ids: Sequence[str], node_scores: dict[str, float], reference: ReferenceCircuit, *,
             absolute: bool = True) -> ROC:
    """ROC over the internal nodes in ``node_ids`` (inputs and ``logits`` left out); unscored nodes rank last."""
    internal = [n for n in node_ids if n not in IO_NODES]
    missing = sorted(set(reference.nodes) - set(node_ids))
    if missing:
        raise ValueError(f"node_roc: reference node {missing[0]!r} is not among the graph's nodes")
    ref = set(reference.nodes)
    vals = [node_scores.get(n, math.nan) for n in internal]
    return roc_curve(vals, [n in ref for n in internal], absolute=absolute, level="node")


def method_rocs(graph: Any, result: Any, reference: ReferenceCircuit) -> dict[str, ROC]:
    """``{"edge": ROC, "node": ROC}`` of a ``DiscoveryResult`` on a ``ComponentGraph`` ranked by the result's
    :meth:`~circuits.algorithms.DiscoveryResult.importance` (``edge`` only for edge-level results;
    neuron-level results are scored at node level by their max importance)."""
    scores = result.scores
    values = result.importance().numpy()  # larger = more important; -inf = unranked (never |.|)
    node_ids = [n.id for n in graph.nodes]
    out: dict[str, ROC] = {}
    ns: dict[str, float] = {}
    if result.level == "edge":
        by_id = dict(zip(scores.ids, values.tolist(), strict=True))
        edge_ids = [e.id for e in graph.edges]
        ev = np.array([by_id.get(e, -math.inf) for e in edge_ids])
        out["edge"] = edge_roc(edge_ids, ev, reference, absolute=False)
        for e, v in zip(edge_ids, ev.tolist(), strict=True):
            for n in edge_endpoints(e):
                ns[n] = max(ns.get(n, -math.inf), v)
    else:
        for uid, v in zip(scores.ids, values.tolist(), strict=True):
            node = owner_node(uid, graph.node_index)  # neuron m0.n3 -> m0
            ns[node] = max(ns.get(node, -math.inf), v)
    out["node"] = node_roc(node_ids, {n: (v if v > -math.inf else math.nan) for n, v in ns.items()}, reference,
                           absolute=False)
    return out


__all__ = ["ROC", "roc_curve", "edge_roc", "node_roc", "node_scores_from_edges", "method_rocs", "IO_NODES",
           "pessimistic_auc", "pareto_points", "roc_from_circuits", "sweep_rocs"]
