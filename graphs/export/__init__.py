"""Circuit graph exporters, one module per format, behind the registry ``EXPORTERS[name](G, path)``.

=============  ==========================================================  ===================
name           format                                                      default suffix
=============  ==========================================================  ===================
graphml        GraphML via networkx (yEd, Gephi, Cytoscape, igraph)        ``.graphml``
gexf           GEXF 1.2 via networkx, with Gephi layout hints              ``.gexf``
nodelink       networkx node-link JSON (the package's own format)          ``.json``
cytoscape      Cytoscape.js JSON (elements + positions)                    ``.cyjs``
dot            Graphviz DOT, hand-written                                  ``.dot``
neuronpedia    Neuronpedia attribution-graph JSON                          ``.np.json``
html           self-contained interactive HTML viewer                      ``.html``
=============  ==========================================================  ===================

Every exporter validates the graph first and returns the path it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import networkx as nx

from graphs.export import cytoscape, dot, gexf, graphml, neuronpedia, nodelink, viewer

Exporter = Callable[[nx.DiGraph, "str | Path"], Path]

EXPORTERS: dict[str, Exporter] = {
    "graphml": graphml.export,
    "gexf": gexf.export,
    "nodelink": nodelink.export,
    "cytoscape": cytoscape.export,
    "dot": dot.export,
    "neuronpedia": neuronpedia.export,
    "html": viewer.export,
}

SUFFIXES: dict[str, str] = {
    ".graphml": "graphml", ".gexf": "gexf", ".json": "nodelink", ".cyjs": "cytoscape", ".dot": "dot",
    ".gv": "dot", ".html": "html", ".htm": "html",
}


def format_for(path: str | Path) -> str:
    """The exporter name implied by a file name (``.np.json`` is neuronpedia); ``ValueError`` if none."""
    name = Path(path).name.lower()
    if name.endswith(".np.json"):
        return "neuronpedia"
    suffix = Path(name).suffix
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot tell the format of {path} from its suffix: pass --format "
                         f"({', '.join(EXPORTERS)})")
    return SUFFIXES[suffix]


def export(G: nx.DiGraph, path: str | Path, format: str | None = None) -> Path:
    """Write ``G`` to ``path`` in ``format`` (default: implied by the suffix)."""
    name = format or format_for(path)
    if name not in EXPORTERS:
        raise ValueError(f"unknown export format {name!r}: choose one of {', '.join(EXPORTERS)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return EXPORTERS[name](G, path)


__all__ = ["EXPORTERS", "SUFFIXES", "export", "format_for"]
