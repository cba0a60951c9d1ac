"""Feature graphs grouped by site: the layout the HTML viewer and the Neuronpedia export share.

A feature circuit (issue #12) has SAE features ``f{L}.{I}@{site}`` and error nodes ``err@{site}`` at several
*sites* (spliced hooks, ``site`` = the hook's short form, ``1.resid_post`` for ``blocks.1.hook_resid_post``),
possibly several per layer (``0.mlp_out`` and ``0.resid_post``). Component graphs draw one column per layer
and sub-layer (:func:`graphs.circuit.positions`); a graph with site nodes gets one column *per site* instead, so
that each SAE's features sit together:

* columns in residual order: the embeddings, then per layer ``resid_pre`` sites, the attention heads, attention
  sites (``attn.*``, ``attn_out``), ``resid_mid`` sites, the MLP / neurons, MLP sites (``mlp.*``, ``mlp_out``),
  ``resid_post`` sites, and other sites of the layer by name; the logits last;
* within a site column: features by decreasing ``|score|`` (then index), the error node last;
* column labels: ``L1 resid_post (SAE name)`` for a site, as :mod:`graphs.export.viewer` labels the others.

A node's site is the part of its id after ``@``; for a legacy ``f{L}.{I}`` id, its ``hook`` attribute's short
form, if any. Graphs without any site node keep :func:`graphs.circuit.positions` (nothing changes for them).
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx

SITE_KINDS = ("feature", "error")
_SUB = (("resid_pre", 0), ("attn", 2), ("resid_mid", 4), ("mlp", 6), ("resid_post", 8))


def hook_short(hook: str) -> str | None:
    """``blocks.1.hook_resid_post`` -> ``1.resid_post``; None for a hook outside the blocks."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_"):
        return None
    return ".".join([*parts[1:-1], parts[-1][len("hook_"):]])


def node_site(n: str, d: dict[str, Any]) -> str | None:
    """The site (hook short form) of a feature / error node, else None (module docstring)."""
    if d.get("kind") not in SITE_KINDS:
        return None
    if "@" in n:
        return n.split("@", 1)[1]
    return hook_short(str(d.get("hook", "")))


def site_key(site: str) -> tuple[int, int, str]:
    """Residual order of a site: ``(layer, sub-position, name)``; sub-positions leave odd slots for the
    components (heads at 1, MLPs at 5), so ``0.attn_out`` follows the layer-0 heads and ``0.mlp_out`` the MLP."""
    layer_text, _, rest = site.partition(".")
    layer = int(layer_text) if layer_text.isdigit() else -1
    for prefix, sub in _SUB:
        if rest == prefix or rest.startswith(prefix + ".") or rest.startswith(prefix + "_"):
            return layer, sub, rest
    return layer, 9, rest


def has_sites(G: nx.DiGraph) -> bool:
    return any(node_site(n, d) is not None for n, d in G.nodes(data=True))


def _component_key(d: dict[str, Any], last_layer: int) -> tuple[float, int, str]:
    kind = d["kind"]
    if kind in ("embed", "pos_embed"):
        return -1, 0, ""
    if kind == "logits":
        return math.inf, 0, ""
    if kind == "attn_head":
        return d["layer"], 1, ""
    return d["layer"], 5, ""  # mlp, neuron, block, legacy feature without a site


def site_layout(G: nx.DiGraph) -> tuple[dict[str, tuple[int, int]], dict[int, str], dict[str, dict[str, Any]]]:
    """``(positions {node: (column, row)}, labels {column: text}, sites {site: {column, hook, sae, layer,
    features, error}})`` of a graph with site nodes (module docstring)."""
    layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] != "logits" and "layer" in d]
    last = max(layers, default=-1)
    keys: dict[str, tuple[float, int, str]] = {}
    sites: dict[str, dict[str, Any]] = {}
    for n, d in G.nodes(data=True):
        s = node_site(n, d)
        if s is None:
            keys[n] = _component_key(d, last)
            continue
        keys[n] = site_key(s)
        info = sites.setdefault(s, {"hook": d.get("hook", ""), "sae": d.get("sae", ""), "layer": d.get("layer"),
                                    "features": 0, "error": None})
        if d["kind"] == "error":
            info["error"] = n
        else:
            info["features"] += 1
        if not info["sae"] and d.get("sae"):
            info["sae"] = d["sae"]
        if not info["hook"] and d.get("hook"):
            info["hook"] = d["hook"]
    columns = {k: i for i, k in enumerate(sorted(set(keys.values())))}
    by_col: dict[int, list[str]] = {}
    for n in G.nodes:
        by_col.setdefault(columns[keys[n]], []).append(n)

    def row_key(n: str) -> tuple[Any, ...]:
        d = G.nodes[n]
        score = d.get("score")
        return (d["kind"] == "error", d["kind"], -abs(score) if isinstance(score, int | float) else 0.0,
                d.get("head", -1), d.get("index", -1), n)

    pos: dict[str, tuple[int, int]] = {}
    for col, nodes in by_col.items():
        for row, n in enumerate(sorted(nodes, key=row_key)):
            pos[n] = (col, row)
    labels: dict[int, str] = {}
    for key, col in columns.items():
        layer, sub, name = key
        if name:  # a site
            site = next(s for s in sites if site_key(s) == key)
            sites[site]["column"] = col
            sae = sites[site]["sae"]
            labels[col] = f"L{int(layer)} {name}" + (f" ({sae})" if sae else "")
        elif layer == -1:
            labels[col] = "embeddings"
        elif layer == math.inf:
            labels[col] = "logits"
        else:
            labels[col] = f"L{int(layer)} " + ("attention" if sub == 1 else "MLP")
    return pos, labels, sites


__all__ = ["SITE_KINDS", "hook_short", "node_site", "site_key", "has_sites", "site_layout"]
