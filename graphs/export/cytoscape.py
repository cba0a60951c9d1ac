"""Cytoscape.js JSON export (``cy.json()`` layout; Cytoscape desktop imports it as ``.cyjs``).

``{"data": graph attrs, "elements": {"nodes": [{"data": {"id", "name", "value", ...attrs}, "position": {x, y},
"classes"}], "edges": [{"data": {"id", "source", "target", ...attrs}, "classes"}]}}``. Positions put
layers left to right (embed at the left, logits at the right); ``classes`` hold the node kind,
``in-circuit`` / ``out-of-circuit`` and, for edges, ``supports`` / ``opposes`` (score sign), for
stylesheets. Extra data for styling: ``width`` (edge width by ``|score|``), ``colour``.
``nx.cytoscape_graph`` reads the file back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx

from graphs.circuit import edge_id, positions, validate
from graphs.export.style import centred_positions, edge_width, max_abs_score, sign_colour


def to_cytoscape(G: nx.DiGraph) -> dict[str, Any]:
    """The Cytoscape.js element JSON of ``G`` (see the module docstring)."""
    validate(G)
    xy = centred_positions(positions(G))
    top = max_abs_score(G)
    nodes = []
    for n, d in G.nodes(data=True):
        x, y = xy[n]
        circuit = "in-circuit" if d.get("in_circuit") else "out-of-circuit"
        nodes.append({"data": {"id": n, "name": n, "value": n, **d}, "position": {"x": x, "y": y},
                      "classes": f"{d['kind']} {circuit}"})
    edges = []
    for u, v, d in G.edges(data=True):
        score = d.get("score")
        classes = ["in-circuit" if d.get("in_circuit") else "out-of-circuit"]
        if score:
            classes.append("supports" if score < 0 else "opposes")
        edges.append({"data": {"id": edge_id(u, v), "source": u, "target": v, **d,
                               "width": edge_width(score, top), "colour": sign_colour(score, G.graph.get("metric"))},
                      "classes": " ".join(classes)})
    return {"format_version": "1.0", "generated_by": "circuitexplain", "target_cytoscapejs_version": "~3",
            "directed": True, "multigraph": False,
            "data": {**G.graph, "name": f"{G.graph['task']} / {G.graph['method']} / {G.graph['model']}"},
            "elements": {"nodes": nodes, "edges": edges}}


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as Cytoscape.js JSON."""
    path = Path(path)
    path.write_text(json.dumps(to_cytoscape(G), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path
