"""Exports of feature circuits (issue #12): the HTML viewer groups features by SAE site, Neuronpedia JSON gives
every feature / error node its own id and validates against the Neuronpedia graph schema.

Oracle graph: a hand-built feature circuit with three sites, two of them in layer 0 (``0.mlp_out`` and
``0.resid_post``) holding a feature with the same SAE index 3, so a layer-based mapping would collide; the
expected columns, rows, ids and weights are written out by hand below.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest

from graphs.circuit import add_component, add_connection, new_circuit, node_ids
from graphs.export import export, neuronpedia, viewer
from graphs.export.sites import node_site, site_key

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "specs" / "neuronpedia-graph-schema.json"

SITES = {"0.mlp_out": "sae-m0", "0.resid_post": "sae-r0", "1.resid_post": "sae-r1"}
HOOKS = {"0.mlp_out": "blocks.0.hook_mlp_out", "0.resid_post": "blocks.0.hook_resid_post",
         "1.resid_post": "blocks.1.hook_resid_post"}


def feature_graph() -> nx.DiGraph:
    G = new_circuit(model="tiny", task="ioi", method="eap-ig", ablation="resample", metric="logit_diff", seed=0,
                    level="feature")
    feats = {"0.mlp_out": [(3, -0.2), (9, -1.5)], "0.resid_post": [(3, -0.9), (40, 0.05)],
             "1.resid_post": [(5, -2.0), (7, 0.4), (11, -0.05)]}
    for site, fs in feats.items():
        L = int(site.split(".")[0])
        for i, sc in fs:
            add_component(G, f"f{L}.{i}@{site}", kind="feature", layer=L, index=i, hook=HOOKS[site], score=sc,
                          in_circuit=abs(sc) > 0.08, sae=SITES[site])
        add_component(G, f"err@{site}", kind="error", layer=L, hook=HOOKS[site], score=-0.3, in_circuit=True,
                      sae=SITES[site])
    add_component(G, "logits", kind="logits", layer=None, hook="ln_final.hook_in")
    add_connection(G, "f0.9@0.mlp_out", "f0.3@0.resid_post", score=-0.7)
    add_connection(G, "err@0.mlp_out", "f0.3@0.resid_post", score=-0.1)
    add_connection(G, "f0.3@0.resid_post", "f1.5@1.resid_post", score=-1.1)
    add_connection(G, "f0.40@0.resid_post", "f1.7@1.resid_post", score=0.02, in_circuit=False)
    add_connection(G, "f1.5@1.resid_post", "logits", score=-2.0)
    add_connection(G, "err@1.resid_post", "logits", score=-0.3)
    add_connection(G, "f1.7@1.resid_post", "logits", score=0.4)
    return G


def test_sites_of_nodes_and_their_order():
    G = feature_graph()
    assert node_site("f0.3@0.mlp_out", G.nodes["f0.3@0.mlp_out"]) == "0.mlp_out"
    assert node_site("err@1.resid_post", G.nodes["err@1.resid_post"]) == "1.resid_post"
    assert node_site("logits", G.nodes["logits"]) is None
    legacy = {"kind": "feature", "layer": 2, "index": 1, "hook": "blocks.2.hook_resid_pre"}
    assert node_site("f2.1", legacy) == "2.resid_pre"
    order = ["0.resid_pre", "0.attn.z", "0.attn_out", "0.resid_mid", "0.mlp.post", "0.mlp_out", "0.resid_post",
             "1.resid_pre", "10.resid_pre"]
    assert sorted(reversed(order), key=site_key) == order


def test_viewer_data_groups_features_by_site():
    data = viewer.viewer_data(feature_graph())
    assert data["columns"] == {0: "L0 mlp_out (sae-m0)", 1: "L0 resid_post (sae-r0)", 2: "L1 resid_post (sae-r1)",
                               3: "logits"}
    by_id = {n["id"]: n for n in data["nodes"]}
    col = {s: i for i, s in enumerate(SITES)}
    for n, d in by_id.items():
        if n != "logits":
            assert d["site"] == n.split("@")[1] and d["col"] == col[d["site"]]
    # rows: features by |score| (ties: index), the error node last
    column2 = sorted((d["row"], n) for n, d in by_id.items() if d["col"] == 2)
    assert [n for _, n in column2] == ["f1.5@1.resid_post", "f1.7@1.resid_post", "f1.11@1.resid_post",
                                       "err@1.resid_post"]
    assert by_id["f1.5@1.resid_post"]["label"] == "f1.5" and by_id["err@1.resid_post"]["label"] == "error"
    assert [(s["site"], s["column"], s["sae"], s["features"], s["error"]) for s in data["sites"]] == [
        ("0.mlp_out", 0, "sae-m0", 2, "err@0.mlp_out"), ("0.resid_post", 1, "sae-r0", 2, "err@0.resid_post"),
        ("1.resid_post", 2, "sae-r1", 3, "err@1.resid_post")]


def test_neuronpedia_feature_graph_validates_and_ids_are_per_site():
    jsonschema = pytest.importorskip("jsonschema")
    assert SCHEMA.is_file(), f"schema not found at {SCHEMA}"
    G = feature_graph()
    data = neuronpedia.to_neuronpedia(G)
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    by = {n["clerp"].split(" ")[0]: n for n in data["nodes"]}
    assert len({n["node_id"] for n in data["nodes"]}) == G.number_of_nodes()
    # the same SAE index 3 at two layer-0 sites: two layers, two ids
    assert (by["f0.3@0.mlp_out"]["node_id"], by["f0.3@0.resid_post"]["node_id"]) == ("0_3_0", "1_3_0")
    f = by["f1.5@1.resid_post"]
    assert (f["layer"], f["feature"], f["feature_type"], f["jsNodeId"], f["influence"]) == (
        "2", 5, "cross layer transcoder", "2_5-0", 2.0)
    assert f["clerp"] == "f1.5@1.resid_post [sae-r1] (score -2)"
    e = by["err@0.resid_post"]
    assert (e["node_id"], e["feature"], e["feature_type"]) == ("1_-1_0", -1, "mlp reconstruction error")
    lg = by["logits"]
    assert (lg["node_id"], lg["layer"], lg["jsNodeId"], lg["is_target_logit"]) == ("3_0_0", "3", "L_0-0", True)
    links = {(lk["source"], lk["target"]): lk["weight"] for lk in data["links"]}
    assert links == {("0_9_0", "1_3_0"): 0.7, ("0_-1_0", "1_3_0"): 0.1, ("1_3_0", "2_5_0"): 1.1,
                     ("1_40_0", "2_7_0"): -0.02, ("2_5_0", "3_0_0"): 2.0, ("2_-1_0", "3_0_0"): 0.3,
                     ("2_7_0", "3_0_0"): -0.4}
    layers = data["metadata"]["circuitexplain_layers"]
    assert layers["1"] == {"label": "L0 resid_post (sae-r0)", "site": "0.resid_post",
                           "hook": "blocks.0.hook_resid_post", "sae": "sae-r0"}
    assert layers["3"] == {"label": "logits"}
    pinned = set(data["qParams"]["pinnedIds"])
    assert pinned == {by[n]["node_id"] for n in node_ids(G)} and "1_40_0" not in pinned


def test_component_graphs_keep_their_layout():
    """A graph without site nodes is laid out exactly as before (no site keys)."""
    from graphs.testing import induction_graph

    data = viewer.viewer_data(induction_graph())
    assert "sites" not in data and all("site" not in n for n in data["nodes"])


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, str]] = {}
        self.groups: dict[str, dict[str, str]] = {}
        self.labels: list[str] = []
        self._in_label = False
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "body":
            self.body = a
        elif tag == "g" and "node" in classes:
            self.nodes[a["data-id"]] = a
        elif tag == "rect" and "site-group" in classes:
            self.groups[a["data-site"]] = a
        self._in_label = tag == "text" and "col-label" in classes

    def handle_data(self, data):
        if self._in_label:
            self.labels.append(data)
            self._in_label = False


@pytest.mark.browser
def test_viewer_in_chromium_groups_features_by_site(tmp_path):
    import subprocess

    from test_viewer_browser import CHROME_FLAGS, chromium

    G = feature_graph()
    page = export(G, tmp_path / "features.html")
    out = subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = _Dom()
    dom.feed(out.stdout)
    assert dom.body.get("data-ready") == "true", "viewer script did not finish"
    circuit = node_ids(G)
    assert set(dom.nodes) == set(circuit)  # default view: the circuit (f0.40 and f1.11 are out)
    x = {n: float(re.match(r"translate\(([-\d.]+),", a["transform"]).group(1)) for n, a in dom.nodes.items()}
    site_x = {}
    for n, a in dom.nodes.items():
        if n == "logits":
            assert "data-site" not in a
            continue
        assert a["data-site"] == n.split("@")[1]
        site_x.setdefault(a["data-site"], set()).add(x[n])
    assert all(len(xs) == 1 for xs in site_x.values()), site_x  # one column per site
    xs = [next(iter(site_x[s])) for s in SITES]
    assert xs == sorted(xs) and len(set(xs)) == 3 and max(xs) < x["logits"]  # residual order, logits last
    assert {s: int(g["data-count"]) for s, g in dom.groups.items()} == {"0.mlp_out": 3, "0.resid_post": 2,
                                                                         "1.resid_post": 3}
    assert dom.labels == ["L0 mlp_out (sae-m0)", "L0 resid_post (sae-r0)", "L1 resid_post (sae-r1)", "logits"]
    everything = subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                                 "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + "#all"],
                                capture_output=True, text=True, timeout=120)
    dom_all = _Dom()
    dom_all.feed(everything.stdout)
    assert set(dom_all.nodes) == set(G.nodes)
    assert {s: int(g["data-count"]) for s, g in dom_all.groups.items()} == {"0.mlp_out": 3, "0.resid_post": 3,
                                                                             "1.resid_post": 4}
