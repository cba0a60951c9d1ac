"""circuits.convert: engine results -> CircuitGraph, checked by hand on a small graph."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_algorithms import two_layer_graph

from circuits.algorithms import DiscoveryResult
from circuits.convert import to_circuit_graph
from graphs.circuit import edge_ids, load, save, validate


def fake_scores(ids, values, level):
    return SimpleNamespace(ids=tuple(ids), values=torch.tensor(values, dtype=torch.float32), level=level,
                           method="x", ablation="resample", metric="kl", forward_passes=3, seconds=0.5)


def test_edge_result_to_graph_merges_qkv_and_marks_circuit(tmp_path):
    g = two_layer_graph(heads=1)
    ids = [e.id for e in g.edges]
    values = [0.0] * len(ids)
    by_id = {"embed->a0.h0<q>": 0.25, "embed->a0.h0<k>": -0.75, "embed->a0.h0<v>": 0.5,
             "a0.h0->a1.h0<k>": 1.5, "a1.h0->logits": -2.0, "m0->logits": 0.125}
    for k, v in by_id.items():
        values[ids.index(k)] = v
    kept_ids = {"embed->a0.h0<v>", "embed->a0.h0<k>", "a0.h0->a1.h0<k>", "a1.h0->logits"}
    kept = torch.tensor([i in kept_ids for i in ids])
    res = DiscoveryResult(scores=fake_scores(ids, values, "edge"), kept=kept, level="edge", method="acdc",
                          forward_passes=7, ablations=40, seconds=1.25, stats={})
    G = to_circuit_graph(g, res, model="m", task="t", ablation="resample", metric="kl", seed=0, faithfulness=0.9)
    validate(G)
    assert G.number_of_nodes() == len(g.nodes)
    e = G.edges["embed", "a0.h0"]
    assert (e["score_q"], e["score_k"], e["score_v"]) == (0.25, -0.75, 0.5)
    assert (e["in_circuit_q"], e["in_circuit_k"], e["in_circuit_v"]) == (False, True, True)
    assert e["input"] == "k,v" and e["in_circuit"] is True and e["score"] == -0.75
    assert G.edges["m0", "logits"] == {"input": "", "in_circuit": False, "score": 0.125}
    assert set(edge_ids(G)) == kept_ids
    assert len(edge_ids(G, in_circuit_only=False)) == len(ids)
    in_circ = {n for n, d in G.nodes(data=True) if d["in_circuit"]}
    assert in_circ == {"embed", "a0.h0", "a1.h0", "logits"}
    assert G.graph["forward_passes"] == 7 and G.graph["level"] == "edge" and G.graph["faithfulness"] == 0.9
    assert "score" not in G.nodes["a0.h0"]
    path = save(G, tmp_path / "c.json")
    assert json.loads(path.read_text())["graph"]["method"] == "acdc"
    assert set(edge_ids(load(path))) == kept_ids


def test_node_result_to_graph():
    g = two_layer_graph(heads=2)
    ids = [n.id for n in g.nodes]
    values = [0.0, -1.0, 0.1, 0.0, -3.0, 0.2, 0.4, 0.0]  # embed a0.h0 a0.h1 m0 a1.h0 a1.h1 m1 logits
    kept = torch.tensor([i in {"a0.h0", "a1.h0"} for i in ids])
    res = DiscoveryResult(scores=fake_scores(ids, values, "node"), kept=kept, level="node", method="node-patch",
                          forward_passes=9, ablations=6, seconds=0.1)
    G = to_circuit_graph(g, res, model="m", task="t", ablation="zero", metric="logit_diff", seed=1)
    validate(G)
    assert {n for n, d in G.nodes(data=True) if d["in_circuit"]} == {"embed", "a0.h0", "a1.h0", "logits"}
    assert G.nodes["a1.h0"]["score"] == -3.0 and G.nodes["m1"]["score"] == pytest.approx(0.4)
    assert G.edges["a0.h0", "a1.h0"]["in_circuit"] is True and G.edges["a0.h1", "a1.h0"]["in_circuit"] is False
    assert "score" not in G.edges["a0.h0", "a1.h0"]
