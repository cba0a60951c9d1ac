"""Graphviz DOT export, written by hand (no pygraphviz): ``dot -Tsvg circuit.dot > circuit.svg``.

Layers run left to right (``rankdir=LR``); each drawing column (embed, then each layer's attention
and MLP, then logits) is a ``rank=same`` group. Edges are drawn with ``penwidth`` growing with
``|score|`` and coloured by sign (blue: ablating lowers the metric; red: raises it); edges outside
the circuit are grey and dashed, nodes outside it grey. Every circuit attribute is carried as a
custom attribute with a ``ce_`` prefix (Graphviz ignores unknown attributes), graph attributes on the
graph. All ids and strings are double-quoted with ``\\`` and ``"`` escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from graphs.circuit import edge_id, positions, validate
from graphs.export.style import NEUTRAL, edge_width, kind_fill, max_abs_score, node_label, sign_colour


def quote(value: Any) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as ``\\n`` escapes."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "")
    return '"' + text.replace("\n", "\\n") + '"'


def _attrs(items: dict[str, Any]) -> str:
    return ", ".join(f"{k}={quote(v)}" for k, v in items.items())


def _tooltip(name: str, d: dict[str, Any]) -> str:
    return name + "\n" + "\n".join(f"{k}: {v}" for k, v in d.items())


def to_dot(G: nx.DiGraph) -> str:
    """The DOT source of ``G`` (see the module docstring)."""
    validate(G)
    title = (f"{G.graph['task']} circuit: {G.graph['method']} on {G.graph['model']} "
             f"({G.graph['ablation']} ablation, metric {G.graph['metric']})")
    if "faithfulness" in G.graph:
        title += f", faithfulness {G.graph['faithfulness']:.3g}"
    lines = ["digraph circuit {",
             f"  graph [{_attrs({'rankdir': 'LR', 'label': title, 'labelloc': 't', 'fontname': 'Helvetica', 'ranksep': '1.2', 'nodesep': '0.25', 'newrank': 'true'})}];",
             f"  graph [{_attrs({f'ce_{k}': v for k, v in G.graph.items()})}];",
             f"  node [{_attrs({'shape': 'box', 'style': 'rounded,filled', 'fontname': 'Helvetica', 'fontsize': '11'})}];",
             f"  edge [{_attrs({'arrowsize': '0.6', 'fontname': 'Helvetica', 'fontsize': '9'})}];"]
    columns: dict[int, list[str]] = {}
    for n, (col, _row) in sorted(positions(G).items(), key=lambda item: item[1]):
        columns.setdefault(col, []).append(n)
    for col, members in sorted(columns.items()):
        lines.append(f"  subgraph {quote(f'column_{col}')} {{ rank=same; "
                     + " ".join(f"{quote(n)};" for n in members) + " }")
    for n, d in G.nodes(data=True):
        fill = kind_fill(d["kind"]) if d.get("in_circuit") else "#f5f5f5"
        style = {"label": node_label(n, d), "tooltip": _tooltip(n, d), "fillcolor": fill,
                 "color": "black" if d.get("in_circuit") else NEUTRAL,
                 "fontcolor": "black" if d.get("in_circuit") else "#757575"}
        lines.append(f"  {quote(n)} [{_attrs({**style, **{f'ce_{k}': v for k, v in d.items()}})}];")
    top = max_abs_score(G)
    for u, v, d in G.edges(data=True):
        score = d.get("score")
        inside = bool(d.get("in_circuit"))
        style = {"penwidth": edge_width(score, top), "color": sign_colour(score, G.graph.get("metric")) if inside else "#cccccc",
                 "tooltip": _tooltip(edge_id(u, v), d)}
        if d.get("input"):
            style["label"] = d["input"]
        if not inside:
            style["style"] = "dashed"
        lines.append(f"  {quote(u)} -> {quote(v)} [{_attrs({**style, **{f'ce_{k}': x for k, x in d.items()}})}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as a Graphviz DOT file."""
    path = Path(path)
    path.write_text(to_dot(G), encoding="utf-8")
    return path
