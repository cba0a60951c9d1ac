"""Selection of a circuit from unit scores: top-k / top fraction / |score| threshold, and pruning of edges
that do not lie on a path from the inputs to the logits. Pure functions of tensors and the graph.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.algorithms.order import node_key
from patching.kinds import unit_kind


def _inputs(graph: Any) -> list[int]:
    """Indices of the graph's input nodes (embed, pos_embed: kinds with ``is_input``)."""
    return [i for i, n in enumerate(graph.nodes) if unit_kind(n.kind).is_input]


def _sinks(graph: Any) -> list[int]:
    """Indices of the graph's sink nodes (the logits: kinds with ``is_sink``)."""
    return [i for i, n in enumerate(graph.nodes) if unit_kind(n.kind).is_sink]


def select_units(scores: Float[Tensor, " U"], *, topk: int | None = None, topk_fraction: float | None = None,
                 threshold: float | None = None, eligible: Bool[Tensor, " U"] | None = None) -> Bool[Tensor, " U"]:
    """Mask of the units kept by exactly one rule: the ``topk`` of largest ``|score|``, the top
    ``topk_fraction`` of them (rounded, at least one), or every unit with ``|score| >= threshold``.

    Ties are broken by unit index (the earlier unit wins), so the selection is deterministic.
    ``eligible`` (default: all) restricts the candidates; a fraction counts eligible units only.
    NaN scores are never selected.
    """
    given = [n for n, v in (("topk", topk), ("topk_fraction", topk_fraction), ("threshold", threshold))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"select_units: give exactly one of topk, topk_fraction, threshold (got {given or 'none'})")
    s = scores.detach().float().abs().cpu()
    ok = ~torch.isnan(s)
    if eligible is not None:
        ok &= eligible.cpu()
    if threshold is not None:
        return ok & (s >= threshold)
    n_ok = int(ok.sum())
    k = topk if topk is not None else max(1, int(math.floor(topk_fraction * n_ok + 0.5)))
    k = min(k, n_ok)
    key = torch.where(ok, s, torch.full_like(s, -1.0))
    order = torch.sort(key, descending=True, stable=True).indices
    kept = torch.zeros_like(ok)
    kept[order[:k]] = True
    return kept


def edge_endpoints(graph: Any) -> tuple[list[int], list[int]]:
    """Sender and receiver node indices of every edge of a ComponentGraph."""
    idx = graph.node_index
    return [idx[e.sender] for e in graph.edges], [idx[e.receiver] for e in graph.edges]


def prune_to_connected(graph: Any, kept: Bool[Tensor, " E"]) -> Bool[Tensor, " E"]:
    """Keep only the kept edges on some path from an input node (embed / pos_embed) to the logits.

    An edge ``s -> r`` survives iff ``s`` is reachable from an input and ``r`` reaches the logits through
    kept edges; one pass suffices (every edge on such a path satisfies both conditions).
    """
    if kept.shape != (len(graph.edges),):
        raise ValueError(f"prune_to_connected: mask has shape {tuple(kept.shape)}, graph has {len(graph.edges)} edges")
    senders, receivers = edge_endpoints(graph)
    mask = kept.tolist()
    fwd: dict[int, list[int]] = defaultdict(list)
    bwd: dict[int, list[int]] = defaultdict(list)
    for i, m in enumerate(mask):
        if m:
            fwd[senders[i]].append(receivers[i])
            bwd[receivers[i]].append(senders[i])
    from_inputs = _reach(_inputs(graph), fwd)
    to_logits = _reach(_sinks(graph), bwd)
    out = [m and senders[i] in from_inputs and receivers[i] in to_logits for i, m in enumerate(mask)]
    return torch.tensor(out, dtype=torch.bool, device=kept.device)


def top_connected(graph: Any, scores: Float[Tensor, " E"], k: int) -> Bool[Tensor, " E"]:
    """The connected circuit built from the best-ranked edges with at most ``k`` edges.

    Edges are ranked by ``|score|`` (ties: earlier edge first, NaN last); the result is
    ``prune_to_connected(top m)`` for the largest prefix length m whose connected part has at most ``k``
    edges. The connected part only grows with m, so m is found by bisection (:func:`connected_prefixes`,
    batched). This is "keep the top k, then drop what is not connected", with k counting the edges that
    survive: keeping the literal top k can leave nothing connected when the best-scored edges do not form
    input -> logits paths.
    """
    return connected_prefixes(graph, scores.detach().double().cpu().abs(), [k], connectivity(graph))[0]


_CONNECTIVITY: dict[int, tuple[Any, Any]] = {}


def connectivity(graph: Any) -> Any:
    """A :class:`Connectivity` for ``graph``, built once per graph object (the last few are kept)."""
    hit = _CONNECTIVITY.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    conn = Connectivity(graph)
    if len(_CONNECTIVITY) >= 4:
        _CONNECTIVITY.pop(next(iter(_CONNECTIVITY)))
    _CONNECTIVITY[id(graph)] = (graph, conn)
    return conn


class Connectivity:
    """Batched :func:`circuits.algorithms.select.prune_to_connected`: ``self(masks [K, E]) -> [K, E]``.

    One pass over the nodes in topological order (vectorised over the K masks and each node's edges):
    ``from_in[k, n]`` = n is reachable from an input node through kept edges, ``to_out[k, n]`` = n reaches
    the logits; an edge survives iff it is kept, its sender is reachable and its receiver reaches the logits.
    """

    def __init__(self, graph: Any):
        idx = graph.node_index
        self.n_nodes = len(graph.nodes)
        self.snd = torch.tensor([idx[e.sender] for e in graph.edges], dtype=torch.long)
        self.rcv = torch.tensor([idx[e.receiver] for e in graph.edges], dtype=torch.long)
        self.order = sorted(range(self.n_nodes), key=lambda i: node_key(graph.nodes[i]))
        self.inputs = set(_inputs(graph))
        self.outputs = set(_sinks(graph))
        self.incoming = [torch.nonzero(self.rcv == i).flatten() for i in range(self.n_nodes)]
        self.outgoing = [torch.nonzero(self.snd == i).flatten() for i in range(self.n_nodes)]

    def __call__(self, masks: Bool[Tensor, "K E"]) -> Bool[Tensor, "K E"]:
        K = masks.shape[0]
        masks = masks.cpu()
        from_in = torch.zeros(K, self.n_nodes, dtype=torch.bool)
        to_out = torch.zeros(K, self.n_nodes, dtype=torch.bool)
        for n in self.order:
            if n in self.inputs:
                from_in[:, n] = True
            elif len(self.incoming[n]):
                e = self.incoming[n]
                from_in[:, n] = (masks[:, e] & from_in[:, self.snd[e]]).any(1)
        for n in reversed(self.order):
            if n in self.outputs:
                to_out[:, n] = True
            elif len(self.outgoing[n]):
                e = self.outgoing[n]
                to_out[:, n] = (masks[:, e] & to_out[:, self.rcv[e]]).any(1)
        return masks & from_in[:, self.snd] & to_out[:, self.rcv]


def connected_prefixes(graph: Any, importance: Float[Tensor, " E"], counts: list[int],
                       conn: Connectivity | None = None) -> Bool[Tensor, "K E"]:
    """For each ``k`` in ``counts``, the connected circuit of at most ``k`` edges built from the most
    important edges: ``prune_to_connected(top m)`` for the largest prefix length m of the ranking (larger
    ``importance`` first; ties: lower index; ``-inf`` / NaN edges never enter) whose connected part has at most
    ``k`` edges. For ``importance = |scores|`` this is :func:`top_connected`, the circuit ``discover --topk k``
    keeps. ``-inf`` edges come last (in index order) but do enter, so the largest size is the whole graph;
    NaN edges never enter. All sizes are bisected together, one batched :class:`Connectivity` call per round.
    """
    n = len(graph.edges)
    imp = importance.detach().double().cpu()
    ok = ~torch.isnan(imp)
    key = torch.where(ok, imp, torch.full_like(imp, -math.inf))
    order = torch.sort(-key, stable=True).indices  # -inf and NaN last; NaN cut off by n_ok below
    order = torch.cat([order[ok[order]], order[~ok[order]]])
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    conn = conn or Connectivity(graph)
    K = len(counts)
    k = torch.tensor(list(counts), dtype=torch.long)
    n_ok = int(ok.sum())

    def connected(m: Tensor) -> Bool[Tensor, "K E"]:
        return conn(rank.unsqueeze(0) < m.unsqueeze(1))

    lo, hi = torch.zeros(K, dtype=torch.long), torch.full((K,), n_ok, dtype=torch.long)
    done = connected(hi).sum(1) <= k  # the whole ranking fits: m = n_ok
    lo[done] = n_ok
    while bool(((hi - lo > 1) & ~done).any()):
        mid = (lo + hi) // 2
        fits = connected(mid).sum(1) <= k
        lo = torch.where(~done & fits, mid, lo)
        hi = torch.where(~done & ~fits, mid, hi)
    return connected(lo)


def _reach(starts: list[int], adj: dict[int, list[int]]) -> set[int]:
    seen = set(starts)
    stack = list(starts)
    while stack:
        for nxt in adj.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def nodes_touched(graph: Any, kept_edges: Bool[Tensor, " E"]) -> Bool[Tensor, " N"]:
    """Nodes that are an endpoint of some kept edge."""
    senders, receivers = edge_endpoints(graph)
    out = torch.zeros(len(graph.nodes), dtype=torch.bool)
    for i in torch.nonzero(kept_edges.cpu()).flatten().tolist():
        out[senders[i]] = True
        out[receivers[i]] = True
    return out
