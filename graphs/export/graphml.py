"""GraphML export through networkx (yEd, Gephi, Cytoscape desktop, igraph read it).

Node, edge and graph attributes are written as typed GraphML keys (bool, long, double, string);
:func:`read` loads the file back into the identical circuit graph.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from graphs.circuit import validate


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as GraphML."""
    validate(G)
    path = Path(path)
    nx.write_graphml(G, path)
    return path


def read(path: str | Path) -> nx.DiGraph:
    """Read a GraphML file written by :func:`export` back into a circuit graph."""
    G = nx.read_graphml(Path(path))
    for key in ("node_default", "edge_default"):
        if not G.graph.get(key):
            G.graph.pop(key, None)
    validate(G)
    return nx.DiGraph(G)
