"""GEXF 1.2 export through networkx (Gephi's native format).

Node and edge attributes become typed GEXF attributes. Nodes also get a ``label`` (their id) and
Gephi ``viz`` data: position by layer (left to right), size and colour (in-circuit nodes coloured by
kind, the rest grey). GEXF has no graph attributes, so the graph attributes are stored as JSON in
``<meta><description>``; :func:`read` restores them and drops ``label``/``viz``/edge ``id`` so the
circuit graph comes back identical. ``nx.read_gexf`` reads the file too.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx

from graphs.circuit import positions, validate
from graphs.export.style import NEUTRAL, centred_positions, kind_fill

NS = "http://www.gexf.net/1.2draft"
DESCRIPTION_PREFIX = "circuitexplain graph attributes: "


def _rgb(hex_colour: str) -> dict[str, int]:
    h = hex_colour.lstrip("#")
    return {"r": int(h[0:2], 16), "g": int(h[2:4], 16), "b": int(h[4:6], 16)}


def export(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` as GEXF with Gephi layout hints and the graph attributes in the meta description."""
    validate(G)
    path = Path(path)
    H = G.copy()
    H.graph.clear()
    H.graph["name"] = f"{G.graph['task']} / {G.graph['method']} / {G.graph['model']}"
    xy = centred_positions(positions(G))
    for n, d in H.nodes(data=True):
        x, y = xy[n]
        colour = kind_fill(d["kind"]) if d.get("in_circuit") else NEUTRAL
        d["viz"] = {"position": {"x": x, "y": -y, "z": 0.0}, "size": 10.0, "color": _rgb(colour)}
    nx.write_gexf(H, path)
    ET.register_namespace("", NS)
    ET.register_namespace("viz", "http://www.gexf.net/1.2draft/viz")
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    tree = ET.parse(path)
    meta = tree.getroot().find(f"{{{NS}}}meta")
    if meta is None:
        meta = ET.SubElement(tree.getroot(), f"{{{NS}}}meta")
    ET.SubElement(meta, f"{{{NS}}}description").text = DESCRIPTION_PREFIX + json.dumps(G.graph)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def read(path: str | Path) -> nx.DiGraph:
    """Read a GEXF file written by :func:`export` back into the identical circuit graph."""
    path = Path(path)
    G = nx.DiGraph(nx.read_gexf(path))
    G.graph.clear()
    desc = ET.parse(path).getroot().find(f"{{{NS}}}meta/{{{NS}}}description")
    if desc is None or not (desc.text or "").startswith(DESCRIPTION_PREFIX):
        raise ValueError(f"{path}: no circuitexplain graph attributes in <meta><description>")
    G.graph.update(json.loads(desc.text[len(DESCRIPTION_PREFIX):]))
    for _, d in G.nodes(data=True):
        d.pop("label", None)
        d.pop("viz", None)
    for _, _, d in G.edges(data=True):
        d.pop("id", None)
    validate(G)
    return G
