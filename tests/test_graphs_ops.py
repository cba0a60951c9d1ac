"""graphs.ops: prune / compare / intersect / union against hand-computed answers."""

from __future__ import annotations

import copy

import networkx as nx
import pytest

from graphs.circuit import add_component, add_connection, edge_ids, new_circuit, node_ids, validate
from graphs.ops import compare, intersect, prune, union
from graphs.testing import induction_graph

# Edge inputs of the hand graph: (sender, receiver, input, score, in_circuit). Numbers in comments are
# referred to in the expected answers below.
EDGES = [
    ("embed", "a0.h0", "q", 0.5, True),      # 1
    ("embed", "a0.h0", "k", -0.1, False),    # 2
    ("embed", "a0.h0", "v", -2.0, True),     # 3
    ("embed", "a0.h1", "v", 0.05, False),    # 4
    ("embed", "m0", None, -0.3, False),      # 5
    ("a0.h0", "m0", None, -1.0, True),       # 6
    ("a0.h0", "logits", None, -0.05, False),  # 11 (tied with 4 on |score|)
    ("a0.h1", "a1.h0", "k", -0.8, True),     # 7: a0.h1 has no in-circuit input: not connected to embed
    ("m0", "a1.h0", "q", 0.2, False),        # 8
    ("m0", "logits", None, -1.5, True),      # 9
    ("a1.h0", "logits", None, 0.9, True),    # 10
]


def hand_graph(edges=EDGES, method="eap") -> nx.DiGraph:
    G = new_circuit(model="m", task="t", method=method, ablation="zero", metric="logit_diff", seed=0)
    add_component(G, "embed", kind="embed", layer=-1)
    add_component(G, "a0.h0", kind="attn_head", layer=0, head=0, score=-1.2)
    add_component(G, "a0.h1", kind="attn_head", layer=0, head=1, score=0.4)
    add_component(G, "m0", kind="mlp", layer=0, score=-0.9)
    add_component(G, "a1.h0", kind="attn_head", layer=1, head=0, score=0.1)
    add_component(G, "logits", kind="logits", layer=2)
    for u, v, x, s, c in edges:
        add_connection(G, u, v, input=x, score=s, in_circuit=c)
    for n in G.nodes:
        G.nodes[n]["in_circuit"] = any(d["in_circuit"] for *_, d in [*G.in_edges(n, data=True),
                                                                        *G.out_edges(n, data=True)])
    validate(G)
    return G


def test_prune_marked_circuit_keep_connected():
    G = hand_graph()
    before = copy.deepcopy(G)
    P = prune(G)
    assert nx.utils.graphs_equal(G, before) and G.graph == before.graph  # pure: input untouched
    assert edge_ids(P) == ["embed->a0.h0<q>", "embed->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    assert edge_ids(P, in_circuit_only=False) == edge_ids(P)  # only the circuit is left
    assert list(P.nodes) == ["embed", "a0.h0", "m0", "logits"]
    assert P.edges["embed", "a0.h0"] == {"in_circuit_q": True, "score_q": 0.5, "in_circuit_v": True,
                                          "score_v": -2.0, "input": "q,v", "score": -2.0, "in_circuit": True}
    assert all(d["in_circuit"] for _, d in P.nodes(data=True))
    assert P.nodes["a0.h0"]["score"] == -1.2 and P.graph["method"] == "eap"
    validate(P)


def test_prune_without_connectivity_keeps_dangling_parts():
    P = prune(hand_graph(), keep_connected=False)
    assert edge_ids(P) == ["embed->a0.h0<q>", "embed->a0.h0<v>", "a0.h0->m0", "a0.h1->a1.h0<k>",
                           "m0->logits", "a1.h0->logits"]
    assert set(P.nodes) == {"embed", "a0.h0", "a0.h1", "m0", "a1.h0", "logits"}


def test_prune_topk_and_threshold():
    G = hand_graph()
    # |score| ranking: 3 (2.0), 9 (1.5), 6 (1.0), 10 (0.9), 7 (0.8), 1 (0.5), 5 (0.3), 8 (0.2), 2, 4, 11
    assert edge_ids(prune(G, topk=3)) == ["embed->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    assert prune(G, topk=3).graph["prune_topk"] == 3
    # 10 passes 0.85 but a1.h0 is reachable from embed only through a0.h1 (edge 7, below threshold)
    P = prune(G, threshold=0.85)
    assert edge_ids(P) == ["embed->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    assert P.graph["prune_threshold"] == 0.85
    assert P.edges["embed", "a0.h0"]["input"] == "v" and "score_q" not in P.edges["embed", "a0.h0"]
    assert edge_ids(prune(G, threshold=0.85, keep_connected=False)) == [
        "embed->a0.h0<v>", "a0.h0->m0", "m0->logits", "a1.h0->logits"]
    # threshold first (7 candidates >= 0.25), then the 5 largest
    assert set(edge_ids(prune(G, threshold=0.25, topk=5, keep_connected=False))) == {
        "embed->a0.h0<v>", "m0->logits", "a0.h0->m0", "a1.h0->logits", "a0.h1->a1.h0<k>"}
    # ties on |score| (4 and 11, both 0.05) go to the earlier edge in graph order
    ten = set(edge_ids(prune(G, topk=10, keep_connected=False)))
    assert "embed->a0.h1<v>" in ten and "a0.h0->logits" not in ten and len(ten) == 10
    # with connectivity, topk=10 adds 4 (embed->a0.h1) which connects a0.h1 -> a1.h0 -> logits
    assert "a0.h1->a1.h0<k>" in edge_ids(prune(G, topk=10))
    assert prune(G, topk=0).number_of_nodes() == 0
    with pytest.raises(ValueError, match="topk must be >= 0"):
        prune(G, topk=-1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        prune(G, threshold=-0.1)


def test_prune_node_level():
    G = hand_graph()
    G.graph["level"] = "node"
    # node scores: a0.h0 -1.2, m0 -0.9, a0.h1 0.4, a1.h0 0.1; embed/logits unscored, always kept
    P = prune(G, topk=2)
    assert list(P.nodes) == ["embed", "a0.h0", "m0", "logits"]
    assert set(P.edges) == {("embed", "a0.h0"), ("embed", "m0"), ("a0.h0", "m0"), ("m0", "logits"),
                            ("a0.h0", "logits")}
    assert all(d["in_circuit"] for *_, d in P.edges(data=True))
    assert P.edges["embed", "a0.h0"]["input"] == "q,k,v"  # a node circuit holds every connection
    # a1.h0 alone (threshold 0.1 keeps all four heads; topk=3 drops a1.h0) / connectivity on node level
    assert "a1.h0" not in prune(G, topk=3)
    assert "a1.h0" in prune(G, threshold=0.1)
    # a1.h0 kept but a0.h1 not: without m0 -> a1.h0, a1.h0 is fed only by a0.h1, so it reaches the
    # logits but is not reached from embed -> dropped when connected
    G2 = copy.deepcopy(G)
    G2.nodes["a0.h1"]["score"] = 0.0
    assert set(prune(G2, threshold=0.05)) == {"embed", "a0.h0", "m0", "a1.h0", "logits"}  # via m0 -> a1.h0
    G2.remove_edge("m0", "a1.h0")
    assert set(prune(G2, threshold=0.05)) == {"embed", "a0.h0", "m0", "logits"}
    assert set(prune(G2, threshold=0.05, keep_connected=False)) == {"embed", "a0.h0", "m0", "a1.h0", "logits"}
    # node level without any edges: connectivity cannot be judged, the selection is returned as is
    N = nx.DiGraph(G.subgraph(G.nodes))
    N.remove_edges_from(list(N.edges))
    assert set(prune(N, topk=1)) == {"embed", "a0.h0", "logits"}


def test_prune_fixture_drops_the_dangling_edge():
    G = induction_graph()
    P = prune(G)
    assert "m0" not in P and "a0.h3" not in P  # a0.h3 -> m0 is in circuit but reaches no logit
    assert sorted(edge_ids(P)) == sorted(["pos_embed->a0.h1<q>", "pos_embed->a0.h1<k>", "embed->a0.h1<v>",
                                          "a0.h1->a1.h2<k>", "embed->a1.h2<q>", "embed->a1.h2<v>",
                                          "a1.h2->logits", "embed->logits"])


def reference() -> nx.DiGraph:
    B = hand_graph([
        ("embed", "a0.h0", "v", -1.7, True),
        ("a0.h0", "logits", None, 0.7, True),
        ("embed", "m0", None, -0.6, True),
        ("m0", "logits", None, -1.2, True),
        ("a0.h0", "m0", None, -0.1, False),
    ], method="acdc")
    B.nodes["a1.h0"]["in_circuit"] = True  # a node-only member of the reference
    return B


def test_compare_hand_computed():
    A, B = prune(hand_graph()), reference()
    # edges: A {e->a0.h0<q>, e->a0.h0<v>, a0.h0->m0, m0->logits}, B {e->a0.h0<v>, a0.h0->logits, e->m0,
    # m0->logits}: 2 common of 4 and 4, union 6
    # nodes (no io): A {a0.h0, m0}, B {a0.h0, m0, a1.h0}
    r = compare(A, B)
    assert r["edge_jaccard"] == pytest.approx(2 / 6)
    assert r["edge_precision"] == pytest.approx(0.5) and r["edge_recall"] == pytest.approx(0.5)
    assert r["edge_f1"] == pytest.approx(0.5)
    assert (r["edge_n_a"], r["edge_n_b"], r["edge_n_common"]) == (4, 4, 2)
    assert r["node_jaccard"] == pytest.approx(2 / 3)
    assert r["node_precision"] == pytest.approx(1.0) and r["node_recall"] == pytest.approx(2 / 3)
    assert r["node_f1"] == pytest.approx(0.8)
    io = compare(A, B, include_io=True)  # + embed, logits in both: 4 common of 4 and 5
    assert io["node_precision"] == 1.0 and io["node_recall"] == pytest.approx(0.8)
    assert io["node_jaccard"] == pytest.approx(0.8)
    swapped = compare(B, A)
    assert swapped["node_precision"] == pytest.approx(2 / 3) and swapped["node_recall"] == 1.0
    assert compare(A, A)["edge_f1"] == 1.0 and compare(A, A)["node_jaccard"] == 1.0
    # all scored parts instead of the circuits: A has 4 edge inputs, B 5
    everything = compare(A, B, in_circuit_only=False)
    assert (everything["edge_n_a"], everything["edge_n_b"], everything["edge_n_common"]) == (4, 5, 3)


def test_compare_empty_sets():
    A, B = prune(hand_graph()), reference()
    E = prune(hand_graph(), topk=0)
    both = compare(E, E)
    assert both["edge_jaccard"] == both["edge_precision"] == both["edge_recall"] == both["edge_f1"] == 1.0
    one = compare(E, B)
    assert one["edge_jaccard"] == one["edge_precision"] == one["edge_recall"] == one["edge_f1"] == 0.0
    assert compare(A, E)["edge_recall"] == 0.0 and compare(A, E)["edge_precision"] == 0.0


def test_intersect_and_union():
    A, B = prune(hand_graph()), reference()
    before_a, before_b = copy.deepcopy(A), copy.deepcopy(B)
    inter = intersect(A, B)
    assert edge_ids(inter) == ["embed->a0.h0<v>", "m0->logits"]
    assert list(inter.nodes) == ["embed", "a0.h0", "m0", "logits"]
    assert inter.edges["embed", "a0.h0"] == {"in_circuit_v": True, "score_v": -2.0, "input": "v",
                                              "score": -2.0, "in_circuit": True}  # A's score
    assert inter.edges["m0", "logits"]["score"] == -1.5
    assert inter.graph["operation"] == "intersect(eap, acdc)" and inter.graph["model"] == "m"
    validate(inter)
    uni = union(A, B)
    assert sorted(edge_ids(uni)) == sorted(["embed->a0.h0<q>", "embed->a0.h0<v>", "a0.h0->m0", "m0->logits",
                                            "a0.h0->logits", "embed->m0"])
    assert set(uni.nodes) == {"embed", "a0.h0", "m0", "logits", "a1.h0"}
    assert uni.edges["embed", "a0.h0"]["input"] == "q,v" and uni.edges["embed", "a0.h0"]["score_v"] == -2.0
    assert uni.edges["a0.h0", "logits"]["score"] == 0.7 and uni.edges["embed", "m0"]["score"] == -0.6  # from B
    assert node_ids(uni) == list(uni.nodes)
    validate(uni)
    assert nx.utils.graphs_equal(A, before_a) and nx.utils.graphs_equal(B, before_b)
    # set identities the compare numbers must agree with
    r = compare(A, B)
    assert len(edge_ids(inter)) == r["edge_n_common"]
    assert len(edge_ids(uni)) == r["edge_n_a"] + r["edge_n_b"] - r["edge_n_common"]


def test_mark_sets_flags_from_a_circuit():
    from graphs.ops import mark

    G = hand_graph()
    M = mark(G, prune(G, topk=3))
    assert edge_ids(M) == ["embed->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    assert len(edge_ids(M, in_circuit_only=False)) == len(edge_ids(G, in_circuit_only=False))  # all kept
    assert node_ids(M) == ["embed", "a0.h0", "m0", "logits"]
    d = M.edges["embed", "a0.h0"]
    assert (d["in_circuit_q"], d["in_circuit_k"], d["in_circuit_v"], d["input"], d["score"]) == (
        False, False, True, "v", -2.0)
    assert M.graph["prune_topk"] == 3 and "prune_topk" not in G.graph
    assert edge_ids(G) != edge_ids(M)  # G untouched
    validate(M)
    assert nx.utils.graphs_equal(prune(M), prune(G, topk=3))


def test_an_input_kind_registered_after_import_counts_as_an_input():
    """ops asks the kind registry at call time: a model-input kind registered after graphs.ops was imported is
    left out of compare's node sets (like embed) and kept by node-level prune (inputs are never pruned)."""
    from graphs.circuit import register_node_kind

    register_node_kind("tok_extra", r"tok_extra", is_input=True)
    G = new_circuit(model="m", task="t", method="x", ablation="zero", metric="kl", seed=0, level="node")
    add_component(G, "embed", kind="embed", layer=None)
    add_component(G, "tok_extra", kind="tok_extra", layer=None)
    add_component(G, "m0", kind="mlp", layer=0, score=-1.0, in_circuit=True)
    add_component(G, "logits", kind="logits", layer=None)
    for s in ("embed", "tok_extra"):
        add_connection(G, s, "m0", score=None)
    add_connection(G, "m0", "logits", score=None)
    validate(G)
    assert compare(G, G)["node_n_a"] == 1                      # m0 only: both input kinds left out
    assert compare(G, G, include_io=True)["node_n_a"] == 4
    H = prune(G, topk=1, level="node")
    assert set(H.nodes) == {"embed", "tok_extra", "m0", "logits"}
