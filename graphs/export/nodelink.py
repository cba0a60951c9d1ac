"""networkx node-link JSON, the package's own file format (same as :func:`graphs.circuit.save`)."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from graphs.circuit import load, save


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as node-link JSON (``nx.node_link_graph(data, edges="edges")`` reads it too)."""
    return save(G, path)


read = load
