"""Engine results -> CircuitGraph (the ``graphs`` schema on ``networkx.DiGraph``). Pure functions.

Edge level: every node of the ComponentGraph, and every scored edge with its score and ``in_circuit``
flag; the q / k / v inputs of an attention receiver merge into one split edge
(:func:`graphs.circuit.add_connection`). A node is ``in_circuit`` when a kept edge touches it.

Node / neuron level: every node, scored units with their score and ``in_circuit``; the inputs and the
logits are always in the circuit (they are not units). The ComponentGraph's edges are added unscored,
marked ``in_circuit`` when both ends are (so viewers can draw the circuit). At neuron level the attention
heads are not units (never ablated): they count as in the circuit, and an MLP node is in the circuit
when one of its neurons is.

Feature levels (``feature``, ``feature-edge``): :func:`feature_circuit_graph`.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx

from circuits.algorithms.base import DiscoveryResult
from circuits.algorithms.select import nodes_touched
from graphs.circuit import add_component, add_connection, new_circuit

ENDPOINT_KINDS = ("embed", "pos_embed", "logits")


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def node_membership(graph: Any, result: DiscoveryResult) -> dict[str, bool]:
    """``{node id: in_circuit}`` for every node of ``graph`` given the algorithm's kept units."""
    kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
    if result.level == "edge":
        touched = nodes_touched(graph, result.kept)
        return {n.id: bool(t) for n, t in zip(graph.nodes, touched.tolist(), strict=True)}
    out: dict[str, bool] = {}
    for n in graph.nodes:
        if n.kind in ENDPOINT_KINDS:
            out[n.id] = True
        elif n.id in kept:
            out[n.id] = bool(kept[n.id])
        elif result.level == "neuron" and n.kind == "mlp":
            out[n.id] = any(v for k, v in kept.items() if k.startswith(f"{n.id}.n"))
        else:
            out[n.id] = result.level == "neuron"  # heads are not units at neuron level
    return out


def to_circuit_graph(graph: Any, result: DiscoveryResult, *, model: str, task: str, ablation: str,
                     metric: str, seed: int, **graph_attrs: Any) -> nx.DiGraph:
    """A CircuitGraph of ``result`` on ``graph`` with the given provenance (``None`` attrs are dropped)."""
    values = [float(v) for v in result.scores.values.detach().cpu().tolist()]
    score = dict(zip(result.scores.ids, values, strict=True))
    kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
    member = node_membership(graph, result)
    attrs = {"level": result.level, "forward_passes": result.forward_passes, "seconds": result.seconds,
             "ablations": result.ablations, **graph_attrs}
    G = new_circuit(model=model, task=task, method=result.method, ablation=ablation, metric=metric, seed=seed,
                    **{k: v for k, v in attrs.items() if v is not None})
    node_scored = result.level != "edge"
    for n in graph.nodes:
        layer = n.layer if n.kind != "logits" else None
        add_component(G, n.id, kind=n.kind, layer=layer, head=n.head, index=n.index, hook=n.hook or "",
                      score=_finite(score.get(n.id)) if node_scored else None, in_circuit=member[n.id])
    if result.level == "edge":
        for e in graph.edges:
            add_connection(G, e.sender, e.receiver, input=e.input, score=_finite(score[e.id]),
                           in_circuit=bool(kept[e.id]))
    else:
        for e in graph.edges:
            add_connection(G, e.sender, e.receiver, input=e.input,
                           in_circuit=member[e.sender] and member[e.receiver])
    return G


def feature_circuit_graph(fgraph: Any, scores: Any, kept: Any, nodes: Any, *, model: str, task: str, method: str,
                          ablation: str, metric: str, seed: int, **graph_attrs: Any) -> nx.DiGraph:
    """A CircuitGraph of a feature circuit (:mod:`circuits.discover_features`; schema: graphs/circuit.py).

    Every node of the :class:`patching.features.FeatureGraph`: features (kind ``feature``, ``index`` in its SAE)
    and error nodes (kind ``error``) with ``hook`` (the SAE's site), ``site`` (its short name, for grouping) and
    ``sae`` (the SAE's name); ``logits``. ``nodes`` (``[N]``) marks the circuit's nodes (logits always).
    Level ``feature``: nodes carry their score; every edge of the feature graph is added unscored, in the circuit
    when both ends are. Level ``feature-edge``: every edge carries its score and ``kept`` flag (aligned with
    ``fgraph.edges``). Graph attributes add ``level``, ``sites`` and ``saes`` (comma-separated, forward order),
    ``max_features_per_site``, ``min_activation`` and ``n_features`` (candidates in the graph).
    """
    level = scores.level
    values = [float(v) for v in scores.values.detach().cpu().tolist()]
    in_c = [bool(v) for v in nodes.tolist()]
    meta = fgraph.meta
    attrs = {"level": level, "sites": ",".join(s.hook for s in fgraph.sites),
             "saes": ",".join(s.sae for s in fgraph.sites), "min_activation": meta.get("min_activation"),
             "max_features_per_site": meta.get("max_features_per_site"),
             "n_features": sum(len(s.candidates) for s in fgraph.sites), **graph_attrs}
    G = new_circuit(model=model, task=task, method=method, ablation=ablation, metric=metric, seed=seed,
                    **{k: v for k, v in attrs.items() if v is not None})
    for i, n in enumerate(fgraph.nodes):
        score = _finite(values[i]) if level == "feature" and n.kind != "logits" else None
        if n.kind == "logits":
            add_component(G, n.id, kind="logits", layer=None, hook=n.hook, in_circuit=True)
            continue
        site = fgraph.sites[n.site]
        add_component(G, n.id, kind=n.kind, layer=n.layer, index=n.index, hook=n.hook, score=score,
                      in_circuit=in_c[i], sae=n.sae, site=site.short)
    kept_l = [bool(v) for v in kept.tolist()]
    for j, e in enumerate(fgraph.edges):
        if level == "feature-edge":
            add_connection(G, e.sender, e.receiver, score=_finite(values[j]), in_circuit=kept_l[j])
        else:
            add_connection(G, e.sender, e.receiver,
                           in_circuit=in_c[fgraph.node_index[e.sender]] and in_c[fgraph.node_index[e.receiver]])
    return G
