"""graphs.circuit: schema, builders, validation, ids, node-link round trip, drawing positions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import networkx as nx
import pytest

from graphs.circuit import (
    add_component,
    add_connection,
    edge_ids,
    edge_inputs,
    load,
    new_circuit,
    node_ids,
    package_version,
    parse_edge_id,
    parse_node_id,
    positions,
    save,
    validate,
)
from graphs.testing import PLANTED, induction_graph


def small() -> nx.DiGraph:
    G = new_circuit(model="m", task="t", method="eap", ablation="mean", metric="logit_diff", seed=3)
    add_component(G, "embed", kind="embed", layer=None)
    add_component(G, "a0.h0", kind="attn_head", layer=0, head=0, score=-1.0)
    add_component(G, "a0.h1", kind="attn_head", layer=0, head=1, in_circuit=False)
    add_component(G, "m0", kind="mlp", layer=0, hook="blocks.0.hook_mlp_out")
    add_component(G, "a1.h0", kind="attn_head", layer=1, head=0)
    add_component(G, "logits", kind="logits", layer=None)
    return G


def assert_identical(G: nx.DiGraph, H: nx.DiGraph) -> None:
    """Same nodes, edges (in order), attributes and graph attributes, with the same value types."""
    assert nx.utils.graphs_equal(G, H)
    assert list(G.nodes) == list(H.nodes) and list(G.edges) == list(H.edges)
    assert G.graph == H.graph
    for key, value in G.graph.items():
        assert type(H.graph[key]) is type(value), key
    for n, d in G.nodes(data=True):
        assert H.nodes[n] == d
        assert {k: type(v) for k, v in H.nodes[n].items()} == {k: type(v) for k, v in d.items()}, n
    for u, v, d in G.edges(data=True):
        assert H.edges[u, v] == d
        assert {k: type(x) for k, x in H.edges[u, v].items()} == {k: type(x) for k, x in d.items()}, (u, v)


@pytest.mark.parametrize("text, expected", [
    ("embed", {"kind": "embed", "layer": -1}),
    ("pos_embed", {"kind": "pos_embed", "layer": -1}),
    ("a1.h3", {"kind": "attn_head", "layer": 1, "head": 3}),
    ("a12.h10", {"kind": "attn_head", "layer": 12, "head": 10}),
    ("m0", {"kind": "mlp", "layer": 0}),
    ("m2.n17", {"kind": "neuron", "layer": 2, "index": 17}),
    ("f3.4095", {"kind": "feature", "layer": 3, "index": 4095}),
    ("b5", {"kind": "block", "layer": 5}),
    ("logits", {"kind": "logits"}),
])
def test_parse_node_id(text, expected):
    assert parse_node_id(text) == expected


@pytest.mark.parametrize("text", ["", "a1", "a1.h", "h1.a1", "m0.n", "embed ", "A1.H2", "logit", "m-1", 3, None])
def test_parse_node_id_rejects(text):
    with pytest.raises(ValueError, match="bad node id"):
        parse_node_id(text)


def test_parse_edge_id():
    assert parse_edge_id("a0.h1->a1.h2<k>") == ("a0.h1", "a1.h2", "k")
    assert parse_edge_id("m0->logits") == ("m0", "logits", None)
    for bad in ("a0.h1->a1.h2<x>", "a0.h1-a1.h2", "a0.h1->", "q0->m1"):
        with pytest.raises(ValueError, match="bad (edge|node) id"):
            parse_edge_id(bad)


def test_new_circuit_graph_attrs():
    G = new_circuit(model="gpt2", task="ioi", method="acdc", ablation="resample", metric="kl", seed=7,
                    faithfulness=1, level="edge", forward_passes=12, seconds=2, note=None)
    assert G.graph["version"] == package_version() != ""
    assert G.graph["created"].endswith("+00:00")
    assert type(G.graph["faithfulness"]) is float and type(G.graph["seconds"]) is float
    assert G.graph["forward_passes"] == 12 and "note" not in G.graph
    validate(G)
    with pytest.raises(ValueError, match="graph attribute 'extra'"):
        new_circuit(model="m", task="t", method="x", ablation="a", metric="m", seed=0, extra=[1, 2])


def test_add_component_attrs():
    G = small()
    assert G.nodes["embed"] == {"kind": "embed", "layer": -1, "in_circuit": True}
    assert G.nodes["a0.h0"] == {"kind": "attn_head", "layer": 0, "head": 0, "score": -1.0, "in_circuit": True}
    assert G.nodes["m0"]["hook"] == "blocks.0.hook_mlp_out"
    assert "layer" not in G.nodes["logits"]  # absent = not applicable
    add_component(G, "m0.n5", kind="neuron", layer=None, index=None, score=2)  # filled from the id
    assert G.nodes["m0.n5"] == {"kind": "neuron", "layer": 0, "index": 5, "score": 2.0, "in_circuit": True}
    assert type(G.nodes["m0.n5"]["score"]) is float
    validate(G)


@pytest.mark.parametrize("call, message", [
    (lambda G: add_component(G, "a0.h1", kind="mlp", layer=0), "node a0.h1: kind 'mlp' does not match"),
    (lambda G: add_component(G, "a0.h1", kind="attn_head", layer=0, head=2), r"node a0.h1: head=2 does not match"),
    (lambda G: add_component(G, "a0.h1", kind="attn_head", layer=1, head=1), r"node a0.h1: layer=1 does not match"),
    (lambda G: add_component(G, "m1", kind="mlp", layer=1, head=0), "node m1: a mlp node has no head"),
    (lambda G: add_component(G, "embed", kind="embed", layer=0), "node embed: layer=0 does not match"),
    (lambda G: add_component(G, "m1", kind="mlp", layer=1, score=float("nan")), "node m1: score must be finite"),
    (lambda G: add_component(G, "m1", kind="mlp", layer=1, label=[1]), "node m1: attribute 'label' is list"),
    (lambda G: add_component(G, "x", kind="mlp", layer=1), "bad node id 'x'"),
    (lambda G: add_connection(G, "a0.h0", "a9.h9", input="q"), "node a9.h9 is not in the graph"),
    (lambda G: add_connection(G, "embed", "m0", input="q"), "embed->m0<q>: only attention heads have q/k/v"),
    (lambda G: add_connection(G, "embed", "a0.h0", input="z"), "input must be q, k, v or None"),
])
def test_builders_reject(call, message):
    with pytest.raises(ValueError, match=message):
        call(small())


def test_add_connection_merges_qkv_into_one_edge():
    G = small()
    add_connection(G, "a0.h0", "a1.h0", input="q", score=0.5, in_circuit=False)
    add_connection(G, "a0.h0", "a1.h0", input="k", score=-2.0)
    add_connection(G, "a0.h0", "a1.h0", input="v", score=1.5)
    assert G.number_of_edges() == 1
    assert G.edges["a0.h0", "a1.h0"] == {
        "in_circuit_q": False, "score_q": 0.5, "in_circuit_k": True, "score_k": -2.0,
        "in_circuit_v": True, "score_v": 1.5, "input": "k,v", "score": -2.0, "in_circuit": True}
    add_connection(G, "a0.h0", "a1.h0", input="k", score=0.1, in_circuit=False)  # update one input
    d = G.edges["a0.h0", "a1.h0"]
    assert (d["input"], d["score"], d["in_circuit"]) == ("v", 1.5, True)
    add_connection(G, "a0.h0", "a1.h0", input="v", score=-0.2, in_circuit=False)
    d = G.edges["a0.h0", "a1.h0"]
    assert (d["input"], d["score"], d["in_circuit"]) == ("", 0.5, False)
    add_connection(G, "m0", "logits", score=-3)
    assert G.edges["m0", "logits"] == {"input": "", "score": -3.0, "in_circuit": True}
    with pytest.raises(ValueError, match="cannot mix a plain edge and per-input"):
        add_connection(G, "a0.h0", "a1.h0", score=1.0)
    validate(G)


def test_edge_ids_and_node_ids():
    G = small()
    add_connection(G, "embed", "a0.h0", input="v", score=-1.0)
    add_connection(G, "embed", "a0.h0", input="q", score=0.1, in_circuit=False)
    add_connection(G, "a0.h0", "a1.h0", input="k", score=-0.5)
    add_connection(G, "a0.h1", "m0", score=0.3, in_circuit=False)
    add_connection(G, "a1.h0", "logits", score=-2.0)
    assert edge_ids(G) == ["embed->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"]
    assert edge_ids(G, in_circuit_only=False) == ["embed->a0.h0<q>", "embed->a0.h0<v>", "a0.h0->a1.h0<k>",
                                                   "a0.h1->m0", "a1.h0->logits"]
    assert [e.score for e in edge_inputs(G)] == [0.1, -1.0, -0.5, 0.3, -2.0]
    assert node_ids(G) == ["embed", "a0.h0", "m0", "a1.h0", "logits"]
    assert node_ids(G, in_circuit_only=False) == list(G.nodes)
    fixture = induction_graph()
    assert sorted(edge_ids(fixture)) == sorted(PLANTED)
    assert len(edge_ids(fixture, in_circuit_only=False)) == 137  # 2*4*3 + 6 + 7*4*3 + 11 + 12 hand-counted


def _broken(mutate):
    G = small()
    add_connection(G, "embed", "a0.h0", input="v", score=-1.0)
    add_connection(G, "a0.h0", "m0", score=-0.5)
    add_connection(G, "m0", "logits", score=-0.7)
    mutate(G)
    return G


@pytest.mark.parametrize("mutate, message", [
    (lambda G: G.graph.pop("model"), "graph attribute 'model' is missing"),
    (lambda G: G.graph.update(seed=None), "graph attribute 'seed' is NoneType"),
    (lambda G: G.nodes["m0"].update(foo=None), "node m0: attribute 'foo' is NoneType"),
    (lambda G: G.nodes["m0"].update(foo={"a": 1}), "node m0: attribute 'foo' is dict"),
    (lambda G: G.nodes["m0"].update(score=math.inf), "node m0: attribute 'score' is inf"),
    (lambda G: G.nodes["m0"].update(kind="attn_head"), "node m0: kind 'attn_head' does not match"),
    (lambda G: G.nodes["a0.h0"].update(head=3), "node a0.h0: head=3 does not match"),
    (lambda G: G.nodes["m0"].update(in_circuit=1), "node m0: in_circuit must be a bool"),
    (lambda G: G.nodes["a0.h1"].update(score="high"), "node a0.h1: score must be a number"),
    (lambda G: G.add_node("x0"), "bad node id 'x0'"),
    (lambda G: G.add_edge("a1.h0", "m0", input="", in_circuit=True), "edge a1.h0->m0: the sender does not come before"),
    (lambda G: G.add_edge("a0.h1", "a0.h0", input="", in_circuit=True), "edge a0.h1->a0.h0: the sender does not come"),
    (lambda G: G.add_edge("logits", "m0", input="", in_circuit=True), "edge logits->m0: logits sends nothing"),
    (lambda G: G.add_edge("a0.h1", "m0", input=""), "edge a0.h1->m0: attribute 'in_circuit' is missing"),
    (lambda G: G.edges["embed", "a0.h0"].update(input="q"), r"edge embed->a0.h0: input='q' disagrees"),
    (lambda G: G.edges["embed", "a0.h0"].update(score=-5.0), r"edge embed->a0.h0: score=-5.0 disagrees"),
    (lambda G: G.edges["a0.h0", "m0"].update(input="k"), r"edge a0.h0->m0: input='k' but the edge has no per-input"),
    (lambda G: G.edges["a0.h0", "m0"].update(score_q=1.0), "edge a0.h0->m0: q/k/v attributes on an edge into a mlp"),
    (lambda G: G.edges["m0", "logits"].update(score=1), "edge m0->logits: attribute 'score' is int but it is float"),
    (lambda G: G.nodes["logits"].update(layer=0), "node logits: layer 0 must come after the last layer"),
])
def test_validate_names_the_problem(mutate, message):
    G = _broken(mutate)
    with pytest.raises(ValueError, match=message) as info:
        validate(G)
    assert "\n" not in str(info.value)


def test_validate_rejects_non_digraphs():
    for bad in (nx.Graph(), nx.MultiDiGraph(), {"nodes": []}):
        with pytest.raises(ValueError, match="a circuit graph is a networkx DiGraph"):
            validate(bad)


def test_save_load_round_trip_identical(tmp_path):
    G = induction_graph()
    G.graph["note"] = 'quotes " and unicode \u00e9 \u2192'
    G.nodes["a0.h1"]["label_text"] = "previous-token head"
    path = save(G, tmp_path / "sub" / "g.json")
    H = load(path)
    assert_identical(G, H)
    data = json.loads(path.read_text())
    assert set(data) == {"directed", "multigraph", "graph", "nodes", "edges"}
    assert_identical(G, nx.node_link_graph(data, edges="edges"))  # plain networkx reads it identically
    save(H, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_save_refuses_invalid_graph_and_writes_nothing(tmp_path):
    G = small()
    G.nodes["m0"]["score"] = float("nan")
    with pytest.raises(ValueError, match="node m0: attribute 'score' is nan"):
        save(G, tmp_path / "g.json")
    assert not (tmp_path / "g.json").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="graph file .*missing.json not found"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON: Expecting property name"):
        load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json is not a circuit graph: expected node-link JSON"):
        load(tmp_path / "list.json")
    data = json.loads(save(small(), tmp_path / "ok.json").read_text())
    data["nodes"][1]["id"] = "head0"
    (tmp_path / "badnode.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="badnode.json is not a circuit graph: bad node id 'head0'"):
        load(tmp_path / "badnode.json")
    del data["nodes"][1]["id"]
    (tmp_path / "noid.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="noid.json is not a circuit graph: malformed node or edge entry"):
        load(tmp_path / "noid.json")


def test_positions_layers_left_to_right():
    G = induction_graph()
    pos = positions(G)
    col = {n: c for n, (c, _) in pos.items()}
    assert col["embed"] == col["pos_embed"] == 0  # layer -1 column
    assert col["a0.h0"] == col["a0.h3"] == 1 and col["m0"] == 2 and col["a1.h2"] == 3 and col["m1"] == 4
    assert col["logits"] == 5  # after the last layer
    assert [pos[f"a1.h{h}"][1] for h in range(4)] == [0, 1, 2, 3]
    for u, v in G.edges:
        assert col[u] < col[v], (u, v)
    P = nx.DiGraph(G.subgraph(["embed", "a1.h2", "logits"]))
    assert positions(P) == {"embed": (0, 0), "a1.h2": (1, 0), "logits": (2, 0)}  # empty columns dropped


def test_graphs_does_not_import_torch():
    code = ("import sys, graphs, graphs.ops, graphs.export, graphs.cli, graphs.testing; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'patching', 'circuits', 'explainers', 'evals', 'transformer_lens')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
