"""graphs.export: every format reads back (or parses / validates) with the same content; the CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import networkx as nx
import pytest

from graphs import cli
from graphs.circuit import edge_ids, edge_inputs, load, node_ids, save, validate
from graphs.export import EXPORTERS, cytoscape, dot, export, format_for, gexf, graphml, neuronpedia, viewer
from graphs.ops import prune
from graphs.testing import induction_graph

SCHEMA = Path(__file__).resolve().parents[2] / "shared/specs/neuronpedia-graph-schema.json"


def need(what: str, ok: bool) -> None:
    """Skip locally when a test tool is missing, but fail in CI (env CI set), where it must be installed."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI")
        pytest.skip(f"{what} is not installed")


@pytest.fixture
def G() -> nx.DiGraph:
    g = induction_graph()
    g.graph["task"] = 'say "hi" \\ to <b>&</b>'  # quoting / escaping stress in every format
    return g


def same_content(G: nx.DiGraph, H: nx.DiGraph, drop_node=(), drop_edge=()) -> None:
    assert list(H.nodes) == list(G.nodes)
    assert set(H.edges) == set(G.edges)
    for n, d in G.nodes(data=True):
        got = {k: v for k, v in H.nodes[n].items() if k not in drop_node}
        assert got == d and {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in d.items()}, n
    for u, v, d in G.edges(data=True):
        got = {k: x for k, x in H.edges[u, v].items() if k not in drop_edge}
        assert got == d and {k: type(x) for k, x in got.items()} == {k: type(x) for k, x in d.items()}, (u, v)


def test_registry_and_suffixes(tmp_path):
    assert set(EXPORTERS) == {"graphml", "gexf", "nodelink", "cytoscape", "dot", "neuronpedia", "html"}
    assert format_for("a/b.graphml") == "graphml" and format_for("x.GV") == "dot"
    assert format_for("x.np.json") == "neuronpedia" and format_for("x.json") == "nodelink"
    with pytest.raises(ValueError, match="cannot tell the format of x.txt"):
        format_for("x.txt")
    with pytest.raises(ValueError, match="unknown export format 'svg'"):
        export(induction_graph(), tmp_path / "x.svg", format="svg")


def test_every_exporter_validates_first(tmp_path):
    bad = induction_graph()
    bad.nodes["m0"]["score"] = None
    for name, fn in EXPORTERS.items():
        with pytest.raises(ValueError, match="node m0: attribute 'score' is NoneType"):
            fn(bad, tmp_path / f"bad.{name}")
        assert not (tmp_path / f"bad.{name}").exists(), name


def test_graphml_round_trip(G, tmp_path):
    path = graphml.export(G, tmp_path / "g.graphml")
    H = graphml.read(path)
    same_content(G, H)
    assert H.graph == G.graph
    plain = nx.read_graphml(path)  # what any networkx user gets
    same_content(G, plain)
    assert {k: v for k, v in plain.graph.items() if k not in ("node_default", "edge_default")} == G.graph
    key_ids = re.findall(r'<key id="([^"]+)"', path.read_text())
    assert len(key_ids) == len(set(key_ids))  # GraphML key ids must be unique across node/edge/graph


def test_gexf_round_trip(G, tmp_path):
    path = gexf.export(G, tmp_path / "g.gexf")
    plain = nx.read_gexf(path)
    same_content(G, plain, drop_node=("label", "viz"), drop_edge=("id",))
    assert plain.nodes["a0.h1"]["label"] == "a0.h1"
    xs = {n: plain.nodes[n]["viz"]["position"]["x"] for n in plain}
    assert xs["embed"] < xs["a0.h1"] < xs["m0"] < xs["a1.h2"] < xs["m1"] < xs["logits"]
    H = gexf.read(path)
    same_content(G, H)
    assert H.graph == G.graph


def test_nodelink_is_the_save_format(G, tmp_path):
    path = export(G, tmp_path / "g.json")
    assert path.read_text() == save(G, tmp_path / "s.json").read_text()
    assert nx.utils.graphs_equal(load(path), G)


def test_cytoscape(G, tmp_path):
    path = export(G, tmp_path / "g.cyjs")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(cytoscape.to_cytoscape(G)))
    assert set(data["elements"]) == {"nodes", "edges"}
    assert [e["data"]["id"] for e in data["elements"]["nodes"]] == list(G.nodes)
    assert len({e["data"]["id"] for e in data["elements"]["edges"]}) == G.number_of_edges()
    H = nx.cytoscape_graph(data)  # networkx's reader of the Cytoscape.js format
    same_content(G, H, drop_node=("id", "name", "value"), drop_edge=("id", "source", "target", "width", "colour"))
    assert {k: v for k, v in H.graph.items() if k != "name"} == G.graph
    pos = {e["data"]["id"]: e["position"] for e in data["elements"]["nodes"]}
    assert pos["embed"]["x"] == pos["pos_embed"]["x"] < pos["a0.h0"]["x"] < pos["m0"]["x"] < pos["a1.h0"]["x"]
    assert pos["a1.h0"]["x"] == pos["a1.h3"]["x"] < pos["m1"]["x"] < pos["logits"]["x"]
    assert sorted(pos[f"a0.h{h}"]["y"] for h in range(4)) == [pos[f"a0.h{h}"]["y"] for h in range(4)]
    edge = next(e for e in data["elements"]["edges"] if e["data"]["id"] == "a1.h2->logits")
    assert edge["data"]["width"] == 6.0 and "supports" in edge["classes"] and "in-circuit" in edge["classes"]
    weak = next(e for e in data["elements"]["edges"] if e["data"]["id"] == "embed->logits")
    assert weak["data"]["width"] == pytest.approx(0.5 + 5.5 * 0.6 / 3.0) and "opposes" in weak["classes"]


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1]
    return s.replace('\\"', '"').replace("\\\\", "\\")


def test_dot_structure_and_quoting(G):
    text = dot.to_dot(G)
    assert text.startswith("digraph circuit {") and text.rstrip().endswith("}")
    assert dot.quote('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'
    assert 'ce_task="say \\"hi\\" \\\\ to <b>&</b>"' in text
    for col in range(6):
        assert f'subgraph "column_{col}" {{ rank=same;' in text
    assert re.search(r'subgraph "column_1" \{ rank=same; "a0.h0"; "a0.h1"; "a0.h2"; "a0.h3"; \}', text)


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")  # pyparsing names used by pydot
def test_dot_parses_with_pydot(G):
    try:
        import pydot
    except ImportError:
        pydot = None
    need("pydot (pip, test extra)", pydot is not None)
    (graph,) = pydot.graph_from_dot_data(dot.to_dot(G))
    nodes = {_unquote(n.get_name()): n for n in graph.get_nodes() if _unquote(n.get_name()) not in ("node", "edge", "graph")}
    for sub in graph.get_subgraphs():
        nodes.update({_unquote(n.get_name()): n for n in sub.get_nodes()})
    assert set(nodes) == set(G.nodes)
    attr_nodes = {_unquote(n.get_name()): n for n in graph.get_nodes()}
    assert _unquote(attr_nodes["a0.h1"].get("ce_score")) == str(G.nodes["a0.h1"]["score"])
    assert _unquote(attr_nodes["a0.h1"].get("ce_kind")) == "attn_head"
    edges = {(_unquote(e.get_source()), _unquote(e.get_destination())): e for e in graph.get_edges()}
    assert set(edges) == set(G.edges)
    strong = edges[("a1.h2", "logits")]
    assert float(_unquote(strong.get("penwidth"))) == 6.0 and _unquote(strong.get("color")) == "#2166ac"
    assert _unquote(edges[("embed", "logits")].get("color")) == "#b2182b"
    assert _unquote(edges[("a0.h0", "m0")].get("style")) == "dashed"
    assert _unquote(edges[("a0.h1", "a1.h2")].get("ce_input")) == "k"
    graph_attrs = {k: _unquote(v) for g in graph.get_node("graph") for k, v in g.get_attributes().items()}
    assert graph_attrs["ce_task"] == G.graph["task"] and graph_attrs["rankdir"] == "LR"


def test_dot_renders_with_graphviz(G, tmp_path):
    exe = shutil.which("dot")
    if exe is None:
        pytest.skip("Graphviz `dot` is not installed (Debian package graphviz); pydot covers parsing")
    path = dot.export(G, tmp_path / "g.dot")
    out = subprocess.run([exe, "-Tsvg", str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert "Warning" not in out.stderr and "Error" not in out.stderr
    titles = re.findall(r"<title>(.*?)</title>", out.stdout)
    for n in G.nodes:
        assert n in titles
    assert "a1.h2&#45;&gt;logits" in titles


def test_neuronpedia_validates_against_schema(G):
    jsonschema = pytest.importorskip("jsonschema")
    assert SCHEMA.is_file(), f"schema not found at {SCHEMA}"
    data = neuronpedia.to_neuronpedia(G)
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    by_clerp = {n["clerp"].split(" ")[0]: n for n in data["nodes"]}
    assert len({n["node_id"] for n in data["nodes"]}) == G.number_of_nodes()
    emb = by_clerp["embed"]
    assert (emb["node_id"], emb["layer"], emb["feature_type"], emb["jsNodeId"], emb["ctx_idx"]) == (
        "E_0_0", "E", "embedding", "E_0-0", 0)
    assert by_clerp["pos_embed"]["node_id"] == "E_1_0"
    head = by_clerp["a1.h2"]
    assert (head["node_id"], head["layer"], head["feature"], head["feature_type"]) == ("2_2_0", "2", 2, "lorsa")
    assert head["influence"] == -G.nodes["a1.h2"]["score"]
    mlp = by_clerp["m1"]
    assert (mlp["node_id"], mlp["feature"], mlp["feature_type"]) == ("3_-1_0", -1, "mlp reconstruction error")
    logit = by_clerp["logits"]
    assert (logit["node_id"], logit["layer"], logit["feature_type"], logit["jsNodeId"]) == ("4_0_0", "4", "logit", "L_0-0")
    assert by_clerp["embed"]["influence"] is None
    links = {(lk["source"], lk["target"]): lk["weight"] for lk in data["links"]}
    assert len(links) == G.number_of_edges()
    assert links[("2_2_0", "4_0_0")] == 3.0  # a1.h2 -> logits, score -3.0: supports the logit
    assert links[("E_0_0", "4_0_0")] == -0.6
    assert links[("0_1_0", "2_2_0")] == 2.5
    pinned = set(data["qParams"]["pinnedIds"])
    assert pinned == {n["node_id"] for n in data["nodes"] if n["clerp"].split(" ")[0] in node_ids(G)}
    assert data["metadata"]["scan"] == "attn-2l4h"
    assert data["metadata"]["circuitexplain"] == {**G.graph, "weight_sign": "-score"}
    assert data["metadata"]["slug"] == "attn-2l4h-say-hi-to-b-b-hand"


def test_neuronpedia_sign_follows_the_metric(G):
    """Neuronpedia's positive weight = the source supports the output. For a task metric a supporting unit's
    score m(ablated) - m(clean) is negative; for a divergence (KL) ablating a supporting unit raises the
    metric, so its score is positive already and must not be flipped."""
    assert G.graph["metric"] not in ("kl", "l2")
    task = neuronpedia.to_neuronpedia(G)
    kl_graph = G.copy()
    kl_graph.graph["metric"] = "kl"
    kl = neuronpedia.to_neuronpedia(kl_graph)
    w_task = {(lk["source"], lk["target"]): lk["weight"] for lk in task["links"]}
    w_kl = {(lk["source"], lk["target"]): lk["weight"] for lk in kl["links"]}
    for u, v, d in G.edges(data=True):
        key = next((a, b) for a, b in w_task if a == node_id_of(task, u) and b == node_id_of(task, v))
        assert w_task[key] == -d["score"] and w_kl[key] == d["score"], (u, v)
    head = next(n for n in kl["nodes"] if n["clerp"].startswith("a1.h2"))
    assert head["influence"] == G.nodes["a1.h2"]["score"]
    assert kl["metadata"]["circuitexplain"]["weight_sign"] == "+score"


def node_id_of(data, circuit_node):
    return next(n["node_id"] for n in data["nodes"] if n["clerp"].split(" ")[0] == circuit_node)


def test_neuronpedia_neurons_and_collisions(tmp_path):
    from graphs.circuit import add_component

    G = induction_graph()
    add_component(G, "m1.n7", kind="neuron", layer=1, index=7, score=0.25, in_circuit=False)
    data = neuronpedia.to_neuronpedia(G)
    neuron = next(n for n in data["nodes"] if n["clerp"].startswith("m1.n7"))
    assert (neuron["node_id"], neuron["feature_type"], neuron["influence"]) == ("3_7_0", "cross layer transcoder", -0.25)
    add_component(G, "f1.7", kind="feature", layer=1, index=7)
    with pytest.raises(ValueError, match="node f1.7: Neuronpedia id 3_7_0 is taken by node m1.n7"):
        neuronpedia.to_neuronpedia(G)


def test_html_is_self_contained_and_embeds_the_graph(G):
    page = viewer.to_html(G)
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)  # only the SVG namespace URI
    m = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', page, re.S)
    assert m and json.loads(m.group(1)) == json.loads(json.dumps(viewer.viewer_data(G)))
    data = json.loads(m.group(1))
    assert [n["id"] for n in data["nodes"]] == list(G.nodes)
    assert [e["id"] for e in data["edges"]] == [e.id for e in edge_inputs(G)]
    assert data["columns"] == {"0": "embeddings", "1": "L0 attention", "2": "L0 MLP", "3": "L1 attention",
                               "4": "L1 MLP", "5": "logits"}
    # the title text cannot break out of its elements
    assert "<b>&</b>" not in page.split("<script", 1)[0]
    G.graph["task"] = "</script><script>alert(1)</script>"
    evil = viewer.to_html(G)
    assert "</script><script>alert(1)" not in evil and evil.count("</script>") == 2


# ------------------------------------------------------------------------------------------- CLI

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="circuitexplain")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("fmt, name", [("graphml", "o.graphml"), ("gexf", "o.gexf"), ("nodelink", "o.json"),
                                       ("cytoscape", "o.cyjs"), ("dot", "o.dot"), ("neuronpedia", "o.np.json"),
                                       ("html", "o.html")])
def test_cli_exports_each_format(tmp_path, capsys, fmt, name):
    src = save(induction_graph(), tmp_path / "g.json")
    assert run_cli(["export", str(src), "--format", fmt, "--out", str(tmp_path / "a" / name)]) == 0
    assert (tmp_path / "a" / name).stat().st_size > 0
    assert run_cli(["export", str(src), "--out", str(tmp_path / "b" / name)]) == 0  # format from suffix
    assert (tmp_path / "b" / name).read_bytes().replace(b"\r", b"") != b""
    out = capsys.readouterr().out
    assert f"({fmt}: 13 nodes, 65 edges" in out


def test_cli_in_circuit_only_and_topk(tmp_path):
    src = save(induction_graph(), tmp_path / "g.json")
    assert run_cli(["export", str(src), "--out", str(tmp_path / "c.json"), "--in-circuit-only"]) == 0
    C = load(tmp_path / "c.json")
    assert sorted(edge_ids(C, in_circuit_only=False)) == sorted(edge_ids(prune(load(src))))
    # the 8 largest |score| are the 7 planted induction inputs and the dangling a0.h3 -> m0 (0.7)
    assert run_cli(["export", str(src), "--out", str(tmp_path / "t.json"), "--topk", "8"]) == 0
    assert sorted(edge_ids(load(tmp_path / "t.json"))) == sorted([
        "a1.h2->logits", "a0.h1->a1.h2<k>", "embed->a1.h2<v>", "embed->a1.h2<q>", "pos_embed->a0.h1<k>",
        "embed->a0.h1<v>", "pos_embed->a0.h1<q>"])
    validate(load(tmp_path / "t.json"))


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="graph file .*nope.json not found"):
        run_cli(["export", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.html")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        run_cli(["export", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.html")])
    (tmp_path / "plain.json").write_text(json.dumps(nx.node_link_data(nx.path_graph(3), edges="edges")))
    with pytest.raises(ValueError, match="plain.json is not a circuit graph"):
        run_cli(["export", str(tmp_path / "plain.json"), "--out", str(tmp_path / "x.html")])
    src = save(induction_graph(), tmp_path / "g.json")
    with pytest.raises(ValueError, match="cannot tell the format of .*x.txt"):
        run_cli(["export", str(src), "--out", str(tmp_path / "x.txt")])
    with pytest.raises(ValueError, match="--topk must be >= 0"):
        run_cli(["export", str(src), "--out", str(tmp_path / "x.html"), "--topk", "-2"])
    with pytest.raises(ValueError, match="cannot write"):
        run_cli(["export", str(src), "--out", str(tmp_path), "--format", "html"])  # a directory
    # the standalone entry prints one line and exits 2
    assert cli.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitexplain: error:") and "\n" not in err and "bad.json is not valid JSON" in err


def test_cli_through_the_circuitexplain_entry_point(tmp_path, capsys):
    if "export" not in {ep.name for ep in entry_points(group="circuitexplain.commands")}:
        pytest.skip("entry point export = graphs.cli:register not registered yet (pyproject.toml + pip install -e .)")
    from circuits.cli import main

    src = save(induction_graph(), tmp_path / "g.json")
    assert main(["export", str(src), "--out", str(tmp_path / "v.html")]) == 0
    assert (tmp_path / "v.html").is_file()
    assert main(["export", str(tmp_path / "missing.json"), "--out", str(tmp_path / "v.html")]) == 2
    assert "graph file" in capsys.readouterr().err
