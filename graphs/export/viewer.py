"""Self-contained interactive HTML viewer (registry name ``html``): one file, no CDN, works offline.

The page inlines a hand-written script (``viewer.js``) that draws the circuit as SVG: layers left to
right (embed, then each layer's attention heads and MLP, then logits), one curve per scored edge input
(attention inputs end at the receiver's q / k / v port), width by ``|score|``, colour by sign (blue:
ablating lowers the metric, red: raises it, grey dashed: outside the circuit). Controls: a minimum
``|score|`` slider, an in-circuit-only toggle (on by default when the graph marks a circuit), hover
tooltips with every attribute, wheel zoom and drag pan. The title shows the graph attributes. Every
node is an SVG ``<g class="node" data-id=ID>``, every edge input a ``<g class="edge-group"
data-id=EDGE_ID>``. The graph is embedded as JSON in ``<script type="application/json">``.

Feature circuits (SAE features ``f{L}.{I}@{site}`` and error nodes ``err@{site}``) are grouped by site: one
column per SAE site in residual order (:mod:`graphs.export.sites`), labelled with the site and the SAE, its
nodes framed by a ``<rect class="site-group" data-site=SITE>`` and tagged ``data-site=SITE``.
"""

from __future__ import annotations

import html
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import networkx as nx

from graphs.circuit import draw_column, edge_id, edge_inputs, node_kind, package_version, positions, validate
from graphs.export.sites import has_sites, node_site, site_layout
from graphs.export.style import KIND_FILL


def _column_labels(G: nx.DiGraph) -> dict[int, str]:
    """Label of each compressed drawing column: ``embed``, ``L0 attn``, ``L0 MLP``, ``logits`` ..."""
    layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] != "logits" and "layer" in d]
    last = max(layers, default=-1)
    names: dict[int, str] = {}
    for _, d in G.nodes(data=True):
        raw = draw_column(d, last)
        kind = node_kind(d["kind"])
        if kind is not None and kind.is_input:
            names[raw] = "embeddings"
        elif d["kind"] == "logits":
            names[raw] = "logits"
        elif kind is not None and kind.stage == 0:  # attention heads and any kind registered in the attention stage
            names[raw] = f"L{d['layer']} attention"
        elif d["kind"] == "block":
            names[raw] = f"L{d['layer']} block"
        else:
            names.setdefault(raw, f"L{d['layer']} MLP")
    return {i: names[c] for i, c in enumerate(sorted(names))}


def viewer_data(G: nx.DiGraph) -> dict[str, Any]:
    """The JSON the page embeds: graph attrs, column labels, kind colours, nodes with (column, row),
    one entry per scored edge input, and each DiGraph edge's attributes once (``edge_attrs``).

    A feature graph (nodes at SAE sites, :mod:`graphs.export.sites`) is laid out one column per site; its nodes
    carry ``site`` and a short ``label`` (``f1.17``, ``error``), and ``sites`` lists each site's column, hook,
    SAE and node counts."""
    validate(G)
    grouped = has_sites(G)
    if grouped:
        pos, columns, sites = site_layout(G)
    else:
        pos, columns, sites = positions(G), _column_labels(G), {}
    nodes = []
    for n, d in G.nodes(data=True):
        entry = {"id": n, "col": pos[n][0], "row": pos[n][1], "in_circuit": bool(d.get("in_circuit")),
                 "attrs": dict(d)}
        site = node_site(n, d) if grouped else None
        if site is not None:
            entry["site"] = site
            entry["label"] = "error" if d["kind"] == "error" else n.split("@", 1)[0]
        nodes.append(entry)
    edges = [{"id": e.id, "source": e.sender, "target": e.receiver, "input": e.input, "score": e.score,
              "in_circuit": e.in_circuit} for e in edge_inputs(G)]
    edge_attrs = {edge_id(u, v): dict(d) for u, v, d in G.edges(data=True)}
    data = {"graph": dict(G.graph), "columns": columns, "fill": KIND_FILL, "nodes": nodes, "edges": edges,
            "edge_attrs": edge_attrs}
    if grouped:
        data["sites"] = [{"site": s, **info} for s, info in sorted(sites.items(), key=lambda kv: kv[1]["column"])]
    return data


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` escaped so no tag can close the element."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(G: nx.DiGraph) -> str:
    """The complete viewer page for ``G``."""
    data = viewer_data(G)
    here = files("graphs.export")
    page = here.joinpath("viewer.html").read_text(encoding="utf-8")
    title = f"{G.graph['task']} circuit: {G.graph['method']} on {G.graph['model']}"
    parts = {"__TITLE__": html.escape(title), "__VERSION__": html.escape(package_version()),
             "__CSS__": here.joinpath("viewer.css").read_text(encoding="utf-8"),
             "__DATA__": _script_json(data),
             "__JS__": here.joinpath("viewer.js").read_text(encoding="utf-8")}
    page = re.sub(r"__(TITLE|VERSION|CSS|DATA|JS)__", lambda m: parts[m[0]], page)  # one pass
    return page


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write the viewer page for ``G``."""
    path = Path(path)
    path.write_text(to_html(G), encoding="utf-8")
    return path
