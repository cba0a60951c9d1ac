"""Neuronpedia attribution-graph JSON (the format of Neuronpedia's and circuit-tracer's graph viewer).

Validates against ``shared/specs/neuronpedia-graph-schema.json`` (Anthropic attribution-graph schema).
Mapping (the viewer's graphs have one node per feature per token position; ours have one node per
component, so every node sits at token position ``ctx_idx = 0``):

========================  ==================================  ============================================
circuit node              ``feature_type`` / ``layer``        ``node_id`` / ``jsNodeId`` / ``feature``
========================  ==================================  ============================================
``embed``                 ``embedding`` / ``"E"``             ``E_0_0`` / ``E_0-0`` / 0
``pos_embed``             ``embedding`` / ``"E"``             ``E_1_0`` / ``E_1-0`` / 1
``a{L}.h{H}``             ``lorsa`` (attention unit) / 2L     ``{2L}_{H}_0`` / ``{2L}_{H}-0`` / H
``m{L}``, ``b{L}``        ``mlp reconstruction error`` / 2L+1 ``{2L+1}_-1_0`` / ``{2L+1}_-1-0`` / -1
``m{L}.n{I}``, ``f{L}.{I}``  ``cross layer transcoder`` / 2L+1  ``{2L+1}_{I}_0`` / ``{2L+1}_{I}-0`` / I
``logits``                ``logit`` / 2 * n_layers            ``{2n}_0_0`` / ``L_0-0`` / 0
========================  ==================================  ============================================

A kind registered with :func:`graphs.circuit.register_node_kind` (not in the table) maps by its definition: an input
kind is an ``embedding`` ``E_{i}_0`` (``i`` its place among the input kinds, after ``embed`` 0 and ``pos_embed`` 1);
any other sits in sub-layer 2L (attention ``stage`` 0) or 2L+1 (MLP stage 1), as a ``lorsa`` unit (feature = its
``head``) when it has a head, a ``cross layer transcoder`` (feature = its ``index``) when it has an index, else
as its sub-layer's ``mlp reconstruction error`` (feature -1), like a whole MLP.

**Feature circuits** (nodes ``f{L}.{I}@{site}`` / ``err@{site}`` at SAE sites, :mod:`graphs.export.sites`):
several SAEs may share a layer (``0.mlp_out`` and ``0.resid_post``), so the Neuronpedia ``layer`` is the node's
column in the site layout the HTML viewer draws (residual order: embeddings ``"E"``, then one column per site
and per component group, the logits last). A feature is ``{col}_{I}_0`` (``cross layer transcoder``, ``feature``
= its index in its SAE), the site's error node ``{col}_-1_0`` (``mlp reconstruction error``, Neuronpedia's
error-node type), heads ``lorsa`` and MLPs as above; ``clerp`` adds the SAE name in brackets, and
``metadata.circuitexplain_layers`` maps every layer number to its label, site, hook and SAE.

The layer numbers interleave attention (even) and MLP (odd) sub-layers as Neuronpedia does for graphs
with attention (lorsa) units; a whole MLP (or block) is its sub-layer's "error node": the part of the
output not split into features. ``clerp`` (the label) is our component id plus its score.

Signs: Neuronpedia's ``weight``/``influence`` are positive when the source supports the output, while
our ``score`` is ``m(ablated) - m(clean)``. For a task metric (higher is better: ``logit_diff``,
``prob_diff``, ``accuracy``) a supporting unit has a negative score, so ``weight = -score``; for a divergence
from the clean run (``kl``, ``l2``: :data:`graphs.export.style.LOWER_IS_BETTER`) ablating a supporting unit
*raises* the metric, its score is already positive, and ``weight = +score``. The sign follows the graph's
``metric`` attribute (:func:`support_sign`) for the edge ``weight`` (largest-magnitude input for attention
edges; 0.0 when unscored) and the node ``influence`` (null when unscored); ``metadata.circuitexplain.
weight_sign`` records which was used. ``qParams.pinnedIds`` pins the in-circuit nodes;
``metadata.circuitexplain`` keeps our graph attributes verbatim.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import networkx as nx

from graphs import circuit
from graphs.circuit import node_kind, package_version, validate
from graphs.export.sites import has_sites, site_layout
from graphs.export.style import LOWER_IS_BETTER


def support_sign(metric: str | None) -> float:
    """+1 when a positive score means the unit supports the task (divergence metrics such as ``kl``), else -1."""
    return 1.0 if metric in LOWER_IS_BETTER else -1.0


def _layer_of_logits(G: nx.DiGraph) -> int:
    layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] != "logits"]
    return 2 * (max(layers, default=-1) + 1)


def _is_input(kind: str) -> bool:
    k = node_kind(kind)
    return k is not None and k.is_input


def _feature(d: dict[str, Any]) -> tuple[int, str]:
    """``(feature, feature_type)`` of a node inside a layer: a head ``lorsa``, an MLP / block / SAE error ``-1`` (the
    sub-layer's error node); a registered kind by its attributes: with a ``head`` ``lorsa``, with an ``index``
    ``cross layer transcoder``, with only a layer the error node ``-1``."""
    kind = d["kind"]
    if kind == "attn_head":
        return d["head"], "lorsa"
    if kind in ("mlp", "block", "error"):
        return -1, "mlp reconstruction error"
    if kind in ("neuron", "feature"):
        return d["index"], "cross layer transcoder"
    if "head" in d:
        return d["head"], "lorsa"
    if "index" in d:
        return d["index"], "cross layer transcoder"
    return -1, "mlp reconstruction error"


def node_fields(n: str, d: dict[str, Any], logits_layer: int, sign: float = -1.0) -> dict[str, Any]:
    """The Neuronpedia node for circuit node ``n`` (see the table in the module docstring); ``influence`` is
    ``sign * score`` (:func:`support_sign`)."""
    kind = d["kind"]
    if _is_input(kind):
        feature = circuit.INPUT_KINDS.index(kind)  # embed 0, pos_embed 1, then registered inputs
        layer, node_id, js, ftype = "E", f"E_{feature}_0", f"E_{feature}-0", "embedding"
    elif kind == "logits":
        feature = 0
        layer, node_id, js, ftype = str(logits_layer), f"{logits_layer}_0_0", "L_0-0", "logit"
    else:
        k = node_kind(kind)
        sub = 2 * d["layer"] + (0 if k is not None and k.stage == 0 else 1)
        feature, ftype = _feature(d)
        layer, node_id, js = str(sub), f"{sub}_{feature}_0", f"{sub}_{feature}-0"
    score = d.get("score")
    clerp = n if score is None else f"{n} (score {score:+.4g})"
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": 0, "feature_type": ftype,
            "jsNodeId": js, "clerp": clerp, "influence": None if score is None else sign * score + 0.0,
            "activation": None, **({"is_target_logit": True} if kind == "logits" else {})}


def site_node_fields(n: str, d: dict[str, Any], column: int, sign: float = -1.0) -> dict[str, Any]:
    """The Neuronpedia node of ``n`` in a feature graph (module docstring, "Feature circuits"): the Neuronpedia
    layer is the node's site column."""
    kind = d["kind"]
    if _is_input(kind):
        return node_fields(n, d, 0, sign)
    layer = str(column)
    if kind == "logits":
        feature, node_id, js, ftype = 0, f"{layer}_0_0", "L_0-0", "logit"
    else:
        feature, ftype = _feature(d)
        node_id, js = f"{layer}_{feature}_0", f"{layer}_{feature}-0"
    score = d.get("score")
    label = n if not d.get("sae") else f"{n} [{d['sae']}]"
    clerp = label if score is None else f"{label} (score {score:+.4g})"
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": 0, "feature_type": ftype,
            "jsNodeId": js, "clerp": clerp, "influence": None if score is None else sign * score + 0.0,
            "activation": None, **({"is_target_logit": True} if kind == "logits" else {})}


def _slug(G: nx.DiGraph) -> str:
    text = f"{G.graph['model']}-{G.graph['task']}-{G.graph['method']}".lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "circuit"


def to_neuronpedia(G: nx.DiGraph, *, prompt: str | None = None) -> dict[str, Any]:
    """The Neuronpedia graph JSON of ``G``. ``prompt`` defaults to ``G.graph["prompt"]`` or the task."""
    validate(G)
    logits_layer = _layer_of_logits(G)
    sign = support_sign(G.graph.get("metric"))
    grouped = has_sites(G)
    pos, labels, sites = site_layout(G) if grouped else ({}, {}, {})
    nodes, ids = [], {}
    for n, d in G.nodes(data=True):
        fields = site_node_fields(n, d, pos[n][0], sign) if grouped else node_fields(n, d, logits_layer, sign)
        if fields["node_id"] in ids.values():
            other = next(k for k, v in ids.items() if v == fields["node_id"])
            raise ValueError(f"node {n}: Neuronpedia id {fields['node_id']} is taken by node {other}")
        ids[n] = fields["node_id"]
        nodes.append(fields)
    links = [{"source": ids[u], "target": ids[v], "weight": sign * float(d.get("score", 0.0)) + 0.0}
             for u, v, d in G.edges(data=True)]
    prompt = prompt or str(G.graph.get("prompt", f"task: {G.graph['task']}"))
    created = G.graph["created"]
    try:
        create_ms = datetime.fromisoformat(created).timestamp() * 1000.0
    except ValueError:
        create_ms = 0.0
    metadata: dict[str, Any] = {
        "slug": _slug(G), "scan": str(G.graph["model"]), "prompt_tokens": prompt.split(), "prompt": prompt,
        "info": {
            "description": (f"{G.graph['task']} circuit found by {G.graph['method']} "
                            f"({G.graph['ablation']} ablation, metric {G.graph['metric']})"),
            "generator": {"name": "circuitexplain", "version": package_version()},
            "create_time_ms": create_ms,
        },
        "circuitexplain": {**G.graph, "weight_sign": "+score" if sign > 0 else "-score"},
    }
    if grouped:  # what each Neuronpedia layer number stands for
        metadata["circuitexplain_layers"] = {
            str(c): ({"label": text} | next(({"site": site, "hook": info["hook"], "sae": info["sae"]}
                                             for site, info in sites.items() if info["column"] == c), {}))
            for c, text in labels.items()}
    for key in ("prune_threshold",):
        if key in G.graph:
            metadata["pruning_settings"] = {"edge_threshold": float(G.graph[key])}
    pinned = [ids[n] for n, d in G.nodes(data=True) if d.get("in_circuit")]
    return {"metadata": metadata,
            "qParams": {"pinnedIds": pinned, "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as Neuronpedia graph JSON."""
    path = Path(path)
    path.write_text(json.dumps(to_neuronpedia(G), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path
