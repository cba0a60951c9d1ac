"""A new kind of unit is one class: a kind defined only in this file, registered, and run by the engine.

``AttnLayerKind`` makes a whole attention layer one unit, ``attn{L}``: its output is ``blocks.L.hook_attn_out``
and its edge input is the pre-norm input of that layer's attention (``blocks.L.ln1.hook_in``, which q, k and v
all read). A graph built with it in place of the heads (``kinds=("attn_layer",), without=("attn_head",)``) is
patched and attributed by the unchanged engine; every number is checked against hand-written TransformerLens
hooks (the corrupted run's activations put in by hand; gradients by ``retain_grad``). Circuits discovered over it
(EAP, node patching) convert to circuit graphs that ``graphs`` validates, saves and reloads with no edit to
``graphs`` (circuits.convert registers the engine's kinds with the schema).
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from helpers_graphs import comparable
from helpers_models import gpt2_bridge, random_batch

import graphs.circuit as schema
from circuits.algorithms import DiscoveryConfig, get_algorithm
from circuits.algorithms.nodes import eligible_units
from circuits.algorithms.order import acdc_receivers, node_key
from circuits.convert import owner_node, register_graph_kinds, to_circuit_graph
from graphs.ops import prune
from patching import ComponentGraph, EdgePatcher, NodePatcher, atp, eap, eap_ig
from patching.kinds import UnitKind, parse_node_id, register_kind, unit_kind
from patching.metrics import gather_pos
from patching.senders import MLPFamily


@register_kind
class AttnLayerKind(UnitKind):
    """A whole attention layer ``attn{L}`` as one unit (module docstring)."""

    name = group = "attn_layer"
    pattern, fields = r"attn(\d+)", ("layer",)
    stage, rank = 0, 1          # written in the attention stage of its layer; ordered with the heads
    inputs = (None,)            # one edge input
    default = False             # only in graphs that name it

    def nodes(self, info, layer):
        if layer is None:
            return []
        return [{"id": f"attn{layer}", "layer": layer, "hook": f"blocks.{layer}.hook_attn_out"}]

    def sender(self, wiring, layer, ids):
        hook = f"blocks.{layer}.hook_attn_out"  # one unit of d_model features whose write is its value
        return {"key": f"attn_layer{layer}", "kind": self.group, "layer": layer, "hook": hook,
                "family": MLPFamily(hook, kind=self.group)}

    def receiver(self, wiring, layer, inp, device):
        return {"hook": f"blocks.{layer}.ln1.hook_in", "mode": "resid", "stage": self.stage}


BATCH = random_batch(B=5, P=8, seed=5)
OUT = {"embed": "hook_embed", "pos_embed": "hook_pos_embed",
       **{f"attn{L}": f"blocks.{L}.hook_attn_out" for L in (0, 1)},
       **{f"m{L}": f"blocks.{L}.hook_mlp_out" for L in (0, 1)}}
IN = {**{f"attn{L}": f"blocks.{L}.ln1.hook_in" for L in (0, 1)}, **{f"m{L}": f"blocks.{L}.ln2.hook_in" for L in (0, 1)},
      "logits": "ln_final.hook_in"}


@pytest.fixture(scope="module")
def model():
    return gpt2_bridge(seed=2)


@pytest.fixture(scope="module")
def graph(model):
    return ComponentGraph.from_model(model, kinds=("attn_layer",), without=("attn_head",))


def logit_diff(logits, batch):
    at = gather_pos(logits, batch.pos)
    return at.gather(-1, batch.answer[:, None])[:, 0] - at.gather(-1, batch.wrong[:, None])[:, 0]


def run(model, tokens, hooks):
    with model.hooks(fwd_hooks=hooks):
        return model(tokens)


def cache(model, tokens):
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=list(OUT.values()))
    return {s: c[h] for s, h in OUT.items()}


def test_graph_of_the_new_kind(graph):
    ids = [n.id for n in graph.nodes]
    assert ids == ["embed", "pos_embed", "attn0", "m0", "attn1", "m1", "logits"]
    assert graph.node("attn1").kind == "attn_layer" and graph.node("attn1").hook == "blocks.1.hook_attn_out"
    into = {r: sorted(graph.edges[i].sender for i in graph.incoming(r)) for r in ("attn0", "m0", "attn1", "m1")}
    assert into == {"attn0": ["embed", "pos_embed"], "m0": ["attn0", "embed", "pos_embed"],
                    "attn1": ["attn0", "embed", "m0", "pos_embed"],
                    "m1": ["attn0", "attn1", "embed", "m0", "pos_embed"]}
    assert len(graph.incoming("logits")) == 6 and graph.n_edges == 2 + 3 + 4 + 5 + 6
    # the generic code asks the class: ids, order, eligibility, ACDC's receiver order
    assert parse_node_id("attn3") == {"kind": "attn_layer", "layer": 3, "head": None, "index": None}
    assert sorted(graph.nodes, key=node_key) == list(graph.nodes)
    assert eligible_units(graph, ("embed", "attn0", "m1", "attn1")).tolist() == [False, True, True, True]
    assert [r.id for r in acdc_receivers(graph)] == ["logits", "m1", "attn1", "m0", "attn0"]
    assert unit_kind("attn_layer") is not None and "attn_head" not in {n.kind for n in graph.nodes}
    with pytest.raises(ValueError, match="unknown node kind 'nope'"):
        ComponentGraph.from_model(None, kinds=("nope",))


def test_default_graph_does_not_contain_the_new_kind(model):
    g = ComponentGraph.from_model(model)
    assert "attn_layer" not in {n.kind for n in g.nodes} and "a1.h3" in g.node_index


@pytest.mark.parametrize("suffix", [True, False])
def test_node_patching_of_the_new_kind_matches_hand_hooks(model, graph, suffix):
    p = NodePatcher(model, graph, BATCH, ablation="resample", suffix=suffix)
    src = cache(model, BATCH.corrupt)
    cases = [["attn0"], ["attn1"], ["attn1", "m0"], ["attn0", "m1"], ["attn0", "attn1", "m0", "m1"]]
    got = p.run_logits(torch.stack([graph.node_mask(c) for c in cases]))
    for k, nodes in enumerate(cases):
        hooks = [(OUT[n], lambda x, hook, n=n: src[n]) for n in nodes]
        with torch.no_grad():
            want = gather_pos(run(model, BATCH.clean, hooks), BATCH.pos)
        assert torch.allclose(got[k], want, atol=2e-5), (nodes, (got[k] - want).abs().max())
        assert (want - p.clean_logits).abs().max() > 1e-3, f"{nodes}: no effect, weak oracle"


def hand_edge_logits(model, graph, edges):
    """Logits with ``edges`` resample-ablated by explicit hooks: each receiver's input gets, for each of its
    ablated edges, the sender's corrupted output minus its output in this run."""
    src = cache(model, BATCH.corrupt)
    current: dict[str, torch.Tensor] = {}
    hooks = [(h, lambda x, hook, s=s: current.__setitem__(s, x)) for s, h in OUT.items()]
    by_recv: dict[str, list[str]] = {}
    for eid in edges:
        e = graph.edges[graph.edge_index[eid]]
        by_recv.setdefault(e.receiver, []).append(e.sender)
    hooks += [(IN[r], lambda x, hook, ss=ss: x + sum(src[s] - current[s] for s in ss)) for r, ss in by_recv.items()]
    with torch.no_grad():
        return gather_pos(run(model, BATCH.clean, hooks), BATCH.pos)


EDGE_SETS = [["attn0->attn1"], ["embed->attn1"], ["attn0->m1"], ["attn1->logits"], ["m0->attn1"],
             ["embed->attn0"], ["attn0->attn1", "attn1->logits", "m0->attn1", "attn1->m1"]]


def test_edge_patching_of_the_new_kind_matches_hand_hooks(model, graph):
    p = EdgePatcher(model, graph, BATCH, ablation="resample")
    got = p.run_logits(torch.stack([graph.edge_mask(s) for s in EDGE_SETS]))
    for k, edges in enumerate(EDGE_SETS):
        want = hand_edge_logits(model, graph, edges)
        assert torch.allclose(got[k], want, atol=2e-5), (edges, (got[k] - want).abs().max())
        assert (want - p.clean_logits).abs().max() > 1e-3, f"{edges}: no effect, weak oracle"


def hand_gradients(model, hooks_at, interpolate=None):
    """d(sum of logit differences) / d(activation) at each hook of ``hooks_at`` (a fresh tensor per hook, so the
    residual stream itself is not the leaf); ``interpolate``: hooks replacing the embeddings."""
    saved = {}

    def keep(x, hook, name):  # by the name asked for (hook.name is the aliased hook's own name)
        y = x.clone()
        y.retain_grad()
        saved[name] = y
        return y
    hooks = [(h, lambda x, hook, h=h: keep(x, hook, h)) for h in hooks_at]
    logits = run(model, BATCH.clean, [*(interpolate or []), *hooks])
    logit_diff(logits, BATCH).sum().backward()
    model.zero_grad(set_to_none=True)
    return {h: saved[h].grad for h in hooks_at}


def test_eap_and_atp_of_the_new_kind_match_hand_gradients(model, graph):
    clean, corr = cache(model, BATCH.clean), cache(model, BATCH.corrupt)
    B = len(BATCH.pos)
    grads = hand_gradients(model, sorted(set(IN.values())))
    want = torch.tensor([float(((corr[e.sender] - clean[e.sender]) * grads[IN[e.receiver]]).sum() / B)
                         for e in graph.edges])
    got = eap(model, graph, BATCH, ablation="resample")
    assert want.abs().max() > 0.05
    assert torch.allclose(got.values, want, atol=2e-5), (got.values - want).abs().max()
    # node-level AtP: (corrupted - clean) . d metric / d output, the new kind's output read at hook_attn_out
    out_grads = hand_gradients(model, [OUT[n] for n in ("attn0", "m0", "attn1", "m1")])
    scores = atp(model, graph, BATCH, ablation="resample")
    for n in ("attn0", "m0", "attn1", "m1"):
        w = float(((corr[n] - clean[n]) * out_grads[OUT[n]]).sum() / B)
        assert abs(float(scores.values[scores.ids.index(n)]) - w) < 2e-5, n


def test_eap_ig_of_the_new_kind_matches_hand_integrated_gradients(model, graph):
    clean, corr = cache(model, BATCH.clean), cache(model, BATCH.corrupt)
    steps, B = 3, len(BATCH.pos)
    grads = {h: 0.0 for h in set(IN.values())}
    for k in range(1, steps + 1):
        a = k / steps
        interp = [(OUT[e], lambda x, hook, e=e, a=a: (corr[e] + a * (clean[e] - corr[e])).requires_grad_())
                  for e in ("embed", "pos_embed")]
        for h, g in hand_gradients(model, sorted(grads), interp).items():
            grads[h] = grads[h] + g / steps
    want = torch.tensor([float(((corr[e.sender] - clean[e.sender]) * grads[IN[e.receiver]]).sum() / B)
                         for e in graph.edges])
    got = eap_ig(model, graph, BATCH, ablation="resample", steps=steps)
    assert torch.allclose(got.values, want, atol=2e-5), (got.values - want).abs().max()
    assert not torch.allclose(got.values, eap(model, graph, BATCH).values, atol=1e-3)  # the interpolation matters


# ---- the discovered circuit leaves the engine: circuits.convert -> graphs (no edit to graphs/) -----------------

def to_graph(graph, result, **attrs):
    return to_circuit_graph(graph, result, model="gpt2-random", task="random", ablation="resample",
                            metric="logit_diff", seed=0, **attrs)


def test_eap_circuit_of_the_new_kind_converts_saves_and_reloads(model, graph, tmp_path):
    res = get_algorithm("eap")(model, graph, BATCH, DiscoveryConfig(metric="logit_diff", topk=6))
    kept = res.kept.tolist()
    assert 0 < sum(kept) <= 6
    G = to_graph(graph, res)
    schema.validate(G)
    assert G.nodes["attn1"] == {"kind": "attn_layer", "layer": 1, "hook": "blocks.1.hook_attn_out",
                                "in_circuit": G.nodes["attn1"]["in_circuit"]}
    assert schema.parse_node_id("attn1") == {"kind": "attn_layer", "layer": 1}
    # every scored edge with the algorithm's own score and decision; nodes in the circuit = touched by a kept edge
    for e, v, k in zip(graph.edges, res.scores.values.tolist(), kept, strict=True):
        assert G.edges[e.sender, e.receiver] == {"input": "", "in_circuit": k, "score": v}
    touched = {x for e, k in zip(graph.edges, kept, strict=True) if k for x in (e.sender, e.receiver)}
    assert {n for n, d in G.nodes(data=True) if d["in_circuit"]} == touched
    # the selection (is_input / is_sink) kept only edges on an input -> logits path: checked by networkx
    C = nx.DiGraph([(e.sender, e.receiver) for e, k in zip(graph.edges, kept, strict=True) if k])
    for u, v in C.edges:
        assert any(nx.has_path(C, i, u) or u == i for i in ("embed", "pos_embed") if i in C), (u, v)
        assert nx.has_path(C, v, "logits"), (u, v)
    # the JSON file round-trips; ops and drawing read the new kind's stage (attention before the MLP)
    back = schema.load(schema.save(G, tmp_path / "attn_layer.json"))
    assert comparable(back) == comparable(G)
    col = {n: c for n, (c, _) in schema.positions(G).items()}
    assert col["embed"] < col["attn0"] < col["m0"] < col["attn1"] < col["m1"] < col["logits"]
    schema.validate(prune(G, topk=3))
    G.add_edge("m1", "attn1", input="", in_circuit=False)  # a later stage cannot send to an earlier one
    with pytest.raises(ValueError, match="edge m1->attn1: the sender does not come before the receiver"):
        schema.validate(G)


def test_node_circuit_of_the_new_kind_converts(model, graph, tmp_path):
    res = get_algorithm("node-patch")(model, graph, BATCH, DiscoveryConfig(metric="logit_diff", topk=2))
    G = to_graph(graph, res)
    schema.validate(G)
    score = dict(zip(res.scores.ids, res.scores.values.tolist(), strict=True))
    kept = dict(zip(res.scores.ids, res.kept.tolist(), strict=True))
    assert [u for u, k in kept.items() if k] and sum(kept.values()) == 2
    assert not any(kept[n] for n in ("embed", "pos_embed", "logits"))  # never units
    for n in ("attn0", "attn1", "m0", "m1"):
        assert (G.nodes[n]["score"], G.nodes[n]["in_circuit"]) == (score[n], kept[n])
    assert all(G.nodes[n]["in_circuit"] for n in ("embed", "pos_embed", "logits"))  # inputs and sink: always
    assert comparable(schema.load(schema.save(G, tmp_path / "nodes.json"))) == comparable(G)


def test_graph_schema_registration_is_idempotent_and_rejects_a_conflict():
    register_graph_kinds()
    k = schema.node_kind("attn_layer")
    assert (k.pattern, k.fields, k.is_input, k.stage) == (AttnLayerKind.pattern, ("layer",), False, 0)
    assert schema.register_node_kind("attn_layer", r"attn(\d+)", ["layer"], stage=0) is k
    register_graph_kinds()
    with pytest.raises(ValueError, match="node kind 'attn_layer' is already registered"):
        schema.register_node_kind("attn_layer", r"attn(\d+)", ("layer",), stage=1)
    with pytest.raises(ValueError, match="fields .* must be distinct ones of"):
        schema.register_node_kind("other", r"o(\d+)", ("depth",))
    with pytest.raises(ValueError, match="pattern 'o\\(' is not a regex"):
        schema.register_node_kind("other", r"o(", ())
    with pytest.raises(ValueError, match="bad node id 'zz': .*or logits, or an id of a registered kind: .*attn_layer"):
        schema.parse_node_id("zz")
    assert schema.node_kind("other") is None


def test_unit_owner_is_the_old_id_split(model, graph):
    """circuits.convert.owner_node (the component-id parser) against the string rule it replaces in evals."""
    neurons = ComponentGraph.from_model(model, neurons=True)
    plain = ComponentGraph.from_model(model)
    ids = [n.id for n in neurons.nodes] + [n.id for n in graph.nodes] + ["m12.n7", "m1.n12"]
    for index in (neurons.node_index, plain.node_index, graph.node_index):
        for uid in ids:
            assert owner_node(uid, index) == (uid if uid in index else uid.split(".n")[0]), uid
    for uid in ids:
        assert owner_node(uid) == (uid.split(".n")[0] if uid.startswith("m") else uid), uid


def test_schema_kind_with_split_inputs():
    """A registered kind with split inputs (here k and v only) takes per-input edges like an attention head."""
    schema.register_node_kind("kv_group", r"a(\d+)\.g(\d+)", ("layer", "head"), stage=0, inputs=("k", "v"))
    G = schema.new_circuit(model="m", task="t", method="x", ablation="zero", metric="kl", seed=0)
    schema.add_component(G, "embed", kind="embed", layer=None)
    schema.add_component(G, "a0.g1", kind="kv_group", layer=0, head=1, score=0.5)
    schema.add_component(G, "m0", kind="mlp", layer=0)
    schema.add_connection(G, "embed", "a0.g1", input="k", score=0.5, in_circuit=True)
    schema.add_connection(G, "embed", "a0.g1", input="v", score=-1.0, in_circuit=False)
    schema.add_connection(G, "a0.g1", "m0", score=0.25)
    schema.validate(G)
    e = G.edges["embed", "a0.g1"]
    assert (e["input"], e["score"], e["in_circuit"]) == ("k", -1.0, True)
    assert schema.edge_ids(G, in_circuit_only=False) == ["embed->a0.g1<k>", "embed->a0.g1<v>", "a0.g1->m0"]
    with pytest.raises(ValueError, match=r"edge embed->a0.g1<q>: a kv_group has no q input \(only k, v\)"):
        schema.add_connection(G, "embed", "a0.g1", input="q", score=0.1)
    with pytest.raises(ValueError, match=r"embed->m0<k>: only attention heads have q/k/v inputs \(and kv_group\)"):
        schema.add_connection(G, "embed", "m0", input="k", score=0.1)
    G.edges["embed", "a0.g1"].update(score_q=0.0, in_circuit_q=False)
    with pytest.raises(ValueError, match="edge embed->a0.g1: a kv_group has no q input"):
        schema.validate(G)


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")  # pyparsing names used by pydot
def test_every_exporter_writes_the_new_kind_without_a_colour(model, graph, tmp_path):
    """The EAP circuit over ``attn{L}`` leaves through every format of ``graphs.export`` (no colour registered for
    the kind in ``graphs.export.style``): each file reads back (or parses) with the new nodes, the DOT / GEXF fill of
    an in-circuit ``attn{L}`` is the neutral default, Neuronpedia puts it in the attention sub-layer 2L as that
    sub-layer's error node (it has only a layer) and validates against the schema, the viewer labels its column as
    attention."""
    import json
    import re
    import xml.etree.ElementTree as ET
    from pathlib import Path

    import jsonschema
    import pydot

    from graphs.export import EXPORTERS, export, gexf, graphml
    from graphs.export.style import DEFAULT_FILL, KIND_FILL

    assert "attn_layer" not in KIND_FILL
    G = to_graph(graph, get_algorithm("eap")(model, graph, BATCH, DiscoveryConfig(metric="logit_diff", topk=6)))
    new = ["attn0", "attn1"]
    inside = [n for n in new if G.nodes[n]["in_circuit"]]
    assert inside, "the test needs an attn{L} node in the circuit (the colour of in-circuit nodes)"
    out = {name: export(G, tmp_path / f"circuit.{name}", format=name) for name in EXPORTERS}
    assert set(out) == {"graphml", "gexf", "nodelink", "cytoscape", "dot", "neuronpedia", "html"}

    assert comparable(graphml.read(out["graphml"])) == comparable(G)
    assert comparable(gexf.read(out["gexf"])) == comparable(G)
    assert comparable(schema.load(out["nodelink"])) == comparable(G)
    cy = {e["data"]["id"]: e for e in json.loads(out["cytoscape"].read_text())["elements"]["nodes"]}
    assert all(cy[n]["data"]["kind"] == "attn_layer" and cy[n]["classes"].startswith("attn_layer ") for n in new)

    rgb = {n.get("id"): n.find("{http://www.gexf.net/1.2draft/viz}color").attrib
           for n in ET.parse(out["gexf"]).getroot().iter("{http://www.gexf.net/1.2draft}node")}
    h = DEFAULT_FILL.lstrip("#")
    assert all((rgb[n]["r"], rgb[n]["g"], rgb[n]["b"]) == tuple(str(int(h[i:i + 2], 16)) for i in (0, 2, 4))
               for n in inside)
    (dg,) = pydot.graph_from_dot_data(out["dot"].read_text())
    dnodes = {n.get_name().strip('"'): n for n in dg.get_nodes()}
    assert all(dnodes[n].get("ce_kind") == '"attn_layer"' for n in new)
    assert all(dnodes[n].get("fillcolor") == f'"{DEFAULT_FILL}"' for n in inside)

    data = json.loads(out["neuronpedia"].read_text())
    spec = Path(__file__).resolve().parents[2] / "shared" / "specs" / "neuronpedia-graph-schema.json"
    jsonschema.validate(data, json.loads(spec.read_text()))
    nodes = {n["clerp"].split(" ")[0]: n for n in data["nodes"]}
    assert len({n["node_id"] for n in data["nodes"]}) == len(data["nodes"]) == G.number_of_nodes()
    for L in (0, 1):
        a, m = nodes[f"attn{L}"], nodes[f"m{L}"]
        assert (a["layer"], a["feature"], a["node_id"], a["jsNodeId"], a["feature_type"]) == (
            str(2 * L), -1, f"{2 * L}_-1_0", f"{2 * L}_-1-0", "mlp reconstruction error")
        assert (m["layer"], m["node_id"]) == (str(2 * L + 1), f"{2 * L + 1}_-1_0")  # the MLP after its attention
    assert nodes["logits"]["layer"] == "4"
    links = {(lk["source"], lk["target"]): lk["weight"] for lk in data["links"]}
    assert links[("0_-1_0", "1_-1_0")] == -G.edges["attn0", "m0"]["score"]  # logit_diff: weight = -score

    page = out["html"].read_text()
    m = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', page, re.S)
    view = json.loads(m.group(1))
    col = {n["id"]: n["col"] for n in view["nodes"]}
    assert {n["id"] for n in view["nodes"]} == set(G.nodes)
    assert [view["columns"][str(col[n])] for n in ("embed", "attn0", "m0", "attn1", "m1", "logits")] == [
        "embeddings", "L0 attention", "L0 MLP", "L1 attention", "L1 MLP", "logits"]
