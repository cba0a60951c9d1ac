"""Pure operations on circuit graphs: prune, mark, compare, intersect, union.

Every function returns a new graph (or a dict) and leaves its arguments untouched. The unit of an
edge-level circuit is one *edge input* (``a0.h1->a1.h2<k>``, ``m0->logits``: see
:func:`graphs.circuit.edge_inputs`); the unit of a node-level circuit is one node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import networkx as nx

from graphs.circuit import (
    QKV,
    EdgeInput,
    _refresh_split_edge,
    edge_ids,
    edge_inputs,
    is_split,
    node_ids,
    node_kind,
)

log = logging.getLogger(__name__)


def _is_io(kind: str) -> bool:
    """Whether ``kind`` is a model input or the logits, asked of the registry at call time (a kind registered after
    this module was imported counts)."""
    k = node_kind(kind)
    return kind == "logits" or (k is not None and k.is_input)


def _select(units: list[Any], scores: list[float | None], marked: list[bool],
            threshold: float | None, topk: int | None) -> list[bool]:
    """Which units to keep: the marked ones when no criterion is given, otherwise the scored ones with
    ``|score| >= threshold``, of which the ``topk`` largest ``|score|`` (ties: earlier unit first)."""
    if threshold is None and topk is None:
        return list(marked)
    if topk is not None and topk < 0:
        raise ValueError(f"prune: topk must be >= 0, got {topk}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"prune: threshold must be >= 0, got {threshold}")
    ok = [s is not None and (threshold is None or abs(s) >= threshold) for s in scores]
    if topk is not None:
        order = sorted((i for i in range(len(units)) if ok[i]), key=lambda i: -abs(scores[i]))  # stable
        chosen = set(order[:topk])
        ok = [i in chosen for i in range(len(units))]
    return ok


def _inputs_and_outputs(G: nx.DiGraph) -> tuple[set[str], set[str]]:
    sources = {n for n in G.nodes if G.in_degree(n) == 0}
    sinks = {n for n, d in G.nodes(data=True) if d.get("kind") == "logits"}
    return sources, sinks


def _connected_part(H: nx.DiGraph, sources: set[str], sinks: set[str]) -> nx.DiGraph:
    """The nodes and edges of ``H`` lying on some path from a source to a sink."""
    fwd: set[str] = set()
    for s in sources & set(H.nodes):
        fwd |= {s} | nx.descendants(H, s)
    bwd: set[str] = set()
    for t in sinks & set(H.nodes):
        bwd |= {t} | nx.ancestors(H, t)
    keep = fwd & bwd
    out = H.subgraph(keep).copy()
    out.remove_edges_from([(u, v) for u, v in out.edges if not (u in fwd and v in bwd)])
    return out


def _build(G: nx.DiGraph, nodes: Iterable[str], units: Iterable[EdgeInput],
           lookup: tuple[nx.DiGraph, ...] = ()) -> nx.DiGraph:
    """A new graph with G's graph attrs, the given nodes (attrs from G, else from ``lookup`` graphs) and
    the given edge inputs (edge attrs rebuilt from the units), every part marked ``in_circuit``."""
    sources = (G, *lookup)

    def attrs_of(n: str) -> dict[str, Any]:
        for S in sources:
            if n in S:
                return dict(S.nodes[n])
        raise KeyError(n)

    H = nx.DiGraph()
    H.graph.update(G.graph)
    units = list(units)
    wanted = set(nodes) | {x for e in units for x in (e.sender, e.receiver)}
    ordered = list(dict.fromkeys(n for S in sources for n in S.nodes if n in wanted))
    ordered += sorted(wanted - set(ordered))  # graph order (A's, then B's); unknown ids fail below
    for n in ordered:
        H.add_node(n, **{**attrs_of(n), "in_circuit": True})
    for e in units:
        data = dict(H.edges[e.sender, e.receiver]) if H.has_edge(e.sender, e.receiver) else {}
        if e.input is None:
            data = {"input": "", "in_circuit": True}
            if e.score is not None:
                data["score"] = e.score
        else:
            data[f"in_circuit_{e.input}"] = True
            if e.score is not None:
                data[f"score_{e.input}"] = e.score
            _refresh_split_edge(data)
        H.add_edge(e.sender, e.receiver, **data)
    return H


def prune(G: nx.DiGraph, threshold: float | None = None, topk: int | None = None,
          keep_connected: bool = True, level: str | None = None) -> nx.DiGraph:
    """The circuit of ``G`` as a new graph holding only the kept units (all marked ``in_circuit``).

    Units are edge inputs (``level="edge"``, the default unless ``G.graph["level"]`` says ``node`` or
    ``neuron``) or scored nodes. With neither ``threshold`` nor ``topk`` the units already marked
    ``in_circuit`` are kept; otherwise the scored units with ``|score| >= threshold`` and, of those, the
    ``topk`` of largest ``|score|`` (ties broken by graph order). Unscored nodes (embed, logits) are never
    pruned at node level. With ``keep_connected`` only nodes and edges on a path from an input node (a
    node with no incoming edge in ``G``: embed, pos_embed ...) to ``logits`` remain (at node level this
    uses G's edges among the kept nodes, and is skipped when ``G`` has no edges at all).
    """
    level = level or str(G.graph.get("level", "edge"))
    level = {"feature": "node", "feature-edge": "edge"}.get(level, level)  # feature circuits (docs/features.md)
    if level not in ("edge", "node", "neuron"):
        raise ValueError(f"prune: level must be edge, node or neuron, got {level!r}")
    sources, sinks = _inputs_and_outputs(G)
    if level == "edge":
        units = list(edge_inputs(G))
        keep = _select(units, [u.score for u in units], [u.in_circuit for u in units], threshold, topk)
        H = _build(G, [], [u for u, k in zip(units, keep, strict=True) if k])
        H.graph.update(_prune_attrs(threshold, topk))
        return _connected_part(H, sources, sinks) if keep_connected else H
    scored = [n for n, d in G.nodes(data=True) if "score" in d]
    keep = _select(scored, [G.nodes[n]["score"] for n in scored],
                   [bool(G.nodes[n].get("in_circuit", False)) for n in scored], threshold, topk)
    kept = {n for n, k in zip(scored, keep, strict=True) if k}
    kept |= {n for n, d in G.nodes(data=True) if "score" not in d
             and (d.get("in_circuit", False) or _is_io(d["kind"]))}
    H = G.subgraph([n for n in G.nodes if n in kept]).copy()
    for n in H.nodes:
        H.nodes[n]["in_circuit"] = True
    for _, _, d in H.edges(data=True):  # a node circuit holds every connection among its nodes
        for x in QKV:
            if f"in_circuit_{x}" in d or f"score_{x}" in d:
                d[f"in_circuit_{x}"] = True
        if is_split(d):
            _refresh_split_edge(d)
        else:
            d["in_circuit"] = True
    H.graph.update(_prune_attrs(threshold, topk))
    if keep_connected and G.number_of_edges():
        H = _connected_part(H, sources, sinks)
    elif keep_connected:
        log.info("prune: %s has no edges, so keep_connected cannot apply; kept every selected node",
                 G.graph.get("method", "graph"))
    return H


def mark(G: nx.DiGraph, circuit: nx.DiGraph) -> nx.DiGraph:
    """A copy of the full graph ``G`` whose ``in_circuit`` flags say exactly what ``circuit`` holds in
    circuit (its in-circuit nodes and edge inputs, e.g. the result of :func:`prune`); scores and every
    scored part of ``G`` stay, so the graph can still be re-pruned or drawn with its context."""
    nodes = set(node_ids(circuit))
    units = {e.id for e in edge_inputs(circuit) if e.in_circuit}
    H = G.copy()
    H.graph.update({k: v for k, v in circuit.graph.items() if k.startswith("prune_")})
    for n, d in H.nodes(data=True):
        d["in_circuit"] = n in nodes
    for u, v, d in H.edges(data=True):
        if is_split(d):
            for x in QKV:
                if f"in_circuit_{x}" in d or f"score_{x}" in d:
                    d[f"in_circuit_{x}"] = f"{u}->{v}<{x}>" in units
            _refresh_split_edge(d)
        else:
            d["in_circuit"] = f"{u}->{v}" in units
    return H


def _prune_attrs(threshold: float | None, topk: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if threshold is not None:
        out["prune_threshold"] = float(threshold)
    if topk is not None:
        out["prune_topk"] = int(topk)
    return out


def _ratio(num: int, den: int, both_empty: bool) -> float:
    return num / den if den else (1.0 if both_empty else 0.0)


def _scores(a: set[str], b: set[str]) -> dict[str, float]:
    common = len(a & b)
    empty = not a and not b
    precision = _ratio(common, len(a), empty)
    recall = _ratio(common, len(b), empty)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"jaccard": _ratio(common, len(a | b), empty), "precision": precision, "recall": recall, "f1": f1,
            "n_a": len(a), "n_b": len(b), "n_common": common}


def compare(A: nx.DiGraph, B: nx.DiGraph, *, in_circuit_only: bool = True,
            include_io: bool = False) -> dict[str, float]:
    """Overlap of circuit ``A`` with the reference circuit ``B`` at node and edge level.

    Node sets are the (in-circuit) node ids, leaving out embed / pos_embed / logits unless
    ``include_io`` (every circuit has them); edge sets are the (in-circuit) engine edge ids, one per
    attention input. Returns ``node_`` and ``edge_`` prefixed ``jaccard``, ``precision`` (|A&B|/|A|),
    ``recall`` (|A&B|/|B|), ``f1``, ``n_a``, ``n_b``, ``n_common``. A ratio whose denominator is zero is
    1.0 when both sets are empty and 0.0 otherwise.
    """
    def nodes(G: nx.DiGraph) -> set[str]:
        return {n for n in node_ids(G, in_circuit_only) if include_io or not _is_io(G.nodes[n]["kind"])}

    out: dict[str, float] = {}
    for prefix, a, b in (("node", nodes(A), nodes(B)),
                         ("edge", set(edge_ids(A, in_circuit_only)), set(edge_ids(B, in_circuit_only)))):
        out.update({f"{prefix}_{k}": v for k, v in _scores(a, b).items()})
    return out


def _circuit_units(G: nx.DiGraph) -> dict[str, EdgeInput]:
    return {e.id: e for e in edge_inputs(G) if e.in_circuit}


def _combine(A: nx.DiGraph, B: nx.DiGraph, op: str) -> nx.DiGraph:
    ua, ub = _circuit_units(A), _circuit_units(B)
    na, nb = set(node_ids(A)), set(node_ids(B))
    if op == "intersect":
        unit_ids = [i for i in ua if i in ub]
        node_list = [n for n in node_ids(A) if n in nb]
    else:
        unit_ids = [*ua, *(i for i in ub if i not in ua)]
        node_list = [*node_ids(A), *(n for n in node_ids(B) if n not in na)]
    units = [ua.get(i) or ub[i] for i in unit_ids]
    H = _build(A, node_list, units, lookup=(B,))
    H.graph["operation"] = f"{op}({A.graph.get('method', '?')}, {B.graph.get('method', '?')})"
    return H


def intersect(A: nx.DiGraph, B: nx.DiGraph) -> nx.DiGraph:
    """The parts in both circuits: in-circuit nodes and edge inputs of ``A`` that are also in-circuit in
    ``B`` (plus the endpoints of those edges). Attributes and graph attributes come from ``A``."""
    return _combine(A, B, "intersect")


def union(A: nx.DiGraph, B: nx.DiGraph) -> nx.DiGraph:
    """The parts in either circuit; attributes from ``A`` where it has the part, else from ``B``."""
    return _combine(A, B, "union")


__all__ = ["prune", "mark", "compare", "intersect", "union"]
