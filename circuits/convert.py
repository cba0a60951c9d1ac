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

Node kinds: every conversion first registers each unit kind of the engine (:data:`patching.kinds.KINDS`) with
the graph schema (:func:`register_graph_kinds`), so a kind defined in one class (and registered at any time,
e.g. inside a test) converts, validates and saves with no edit to ``graphs``.
"""

from __future__ import annotations

import math
from collections.abc import Container
from typing import Any

import networkx as nx

from circuits.algorithms.base import DiscoveryResult
from circuits.algorithms.select import nodes_touched
from graphs.circuit import (
    BUILTIN_KINDS,
    add_component,
    add_connection,
    new_circuit,
    node_kind,
    register_node_kind,
)
from patching.kinds import KINDS as UNIT_KINDS
from patching.kinds import UnitKind, parse_node_id, unit_kind


def register_graph_kinds() -> None:
    """Register every unit kind of :data:`patching.kinds.KINDS` with the graph schema
    (:func:`graphs.circuit.register_node_kind`: its id pattern and fields, whether it is an input, its stage, its
    q / k / v inputs).

    Cheap and idempotent; the conversions call it each time, so kinds registered after import count too. The
    schema's built-in kinds keep their own (stricter) id patterns; their other facts must agree with the engine's.
    """
    for k in UNIT_KINDS.values():
        stage = 0 if k.is_input or k.stage == 0 else 1
        inputs = tuple(x for x in k.inputs if x is not None)
        if k.is_sink and k.name != "logits":
            raise ValueError(f"unit kind {k.name!r} ({type(k).__name__}) is a sink: the graph schema has one sink, "
                             "'logits'")
        known = node_kind(k.name) if k.name in BUILTIN_KINDS else None
        if known is None:
            register_node_kind(k.name, k.pattern, k.fields, is_input=k.is_input, stage=stage, inputs=inputs)
        elif (known.fields, known.is_input, known.stage, known.inputs) != (tuple(k.fields), k.is_input, stage, inputs):
            raise ValueError(f"unit kind {k.name!r} ({type(k).__name__}: fields {tuple(k.fields)}, input "
                             f"{k.is_input}, stage {stage}, inputs {inputs}) disagrees with the graph schema's {known}")


def _endpoint(k: UnitKind) -> bool:
    """An input or the sink: always in a circuit, never one of its units."""
    return k.is_input or k.is_sink


def owner_node(uid: str, nodes: Container[str] = ()) -> str:
    """The graph node a scored unit belongs to: ``uid`` itself when it is one of ``nodes``, else the node whose id
    it extends, read by the component-id parser (:func:`patching.kinds.parse_node_id`): the longest prefix before a
    ``.`` that is the id of another kind in the same layer (neuron ``m3.n7`` -> MLP ``m3``); ``uid`` when none is."""
    if uid in nodes:
        return uid
    own = _parse(uid)
    for i in range(len(uid) - 1, 0, -1):
        if uid[i] != ".":
            continue
        p = _parse(uid[:i])
        if p is not None and (own is None or (p["kind"] != own["kind"] and p["layer"] == own["layer"])):
            return uid[:i]
    return uid


def _parse(node_id: str) -> dict[str, Any] | None:
    try:
        return parse_node_id(node_id)
    except ValueError:
        return None


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def node_membership(graph: Any, result: DiscoveryResult) -> dict[str, bool]:
    """``{node id: in_circuit}`` for every node of ``graph`` given the algorithm's kept units."""
    kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
    if result.level == "edge":
        touched = nodes_touched(graph, result.kept)
        return {n.id: bool(t) for n, t in zip(graph.nodes, touched.tolist(), strict=True)}
    owned: dict[str, bool] = {}  # at neuron level: a node holding units (an MLP its neurons) is in when one is
    for uid, k in kept.items() if result.level == "neuron" else ():
        if (node := owner_node(uid)) != uid:
            owned[node] = owned.get(node, False) or bool(k)
    out: dict[str, bool] = {}
    for n in graph.nodes:
        if _endpoint(unit_kind(n.kind)):
            out[n.id] = True
        elif n.id in kept:
            out[n.id] = bool(kept[n.id])
        elif n.id in owned:
            out[n.id] = owned[n.id]
        else:
            out[n.id] = result.level == "neuron"  # heads are not units at neuron level
    return out


def to_circuit_graph(graph: Any, result: DiscoveryResult, *, model: str, task: str, ablation: str,
                     metric: str, seed: int, **graph_attrs: Any) -> nx.DiGraph:
    """A CircuitGraph of ``result`` on ``graph`` with the given provenance (``None`` attrs are dropped)."""
    register_graph_kinds()
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
        layer = None if unit_kind(n.kind).is_sink else n.layer
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
    register_graph_kinds()
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
        sink = unit_kind(n.kind).is_sink
        score = _finite(values[i]) if level == "feature" and not sink else None
        if sink:
            add_component(G, n.id, kind=n.kind, layer=None, hook=n.hook, in_circuit=True)
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


register_graph_kinds()
