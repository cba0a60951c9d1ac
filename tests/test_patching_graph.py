"""Component graphs of TransformerBridges, and the hook facts the engine relies on."""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, mamba_bridge, native_bridge, random_batch

from patching import ComponentGraph, Edge, EdgePatcher, eap
from patching.graph import Node


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bridge()


def expected_edges(n_layers: int, n_heads: int, n_inputs: int, mlp_layers: set[int]) -> int:
    """Hand count: attention receivers read the inputs + everything in earlier layers (x3 for q, k, v),
    an MLP also reads its own layer's heads, logits read every sender."""
    total, senders = 0, n_inputs
    for L in range(n_layers):
        total += 3 * n_heads * senders
        senders += n_heads
        if L in mlp_layers:
            total += senders
            senders += 1
    return total + senders


def test_gpt2_graph_nodes_edges_and_hooks(gpt2):
    g = ComponentGraph.from_model(gpt2)
    ids = [n.id for n in g.nodes]
    assert ids == ["embed", "pos_embed", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0",
                   "a1.h0", "a1.h1", "a1.h2", "a1.h3", "m1", "logits"]
    assert g.n_edges == expected_edges(2, 4, 2, {0, 1}) == 137
    assert g.supports_edges and g.meta["qkv_paths"] == ["projected", "split"]
    for ok in ("a0.h1->a1.h2<k>", "embed->a0.h0<q>", "a1.h0->m1", "m0->a1.h3<v>", "m1->logits", "pos_embed->logits"):
        assert ok in g.edge_index, ok
    for bad in ("a1.h0->a0.h1<q>", "a0.h0->a0.h1<q>", "m1->a1.h0<q>", "m0->m0", "a0.h0->m0<q>", "logits->m1"):
        assert bad not in g.edge_index, bad
    assert g.node("a0.h1") == Node("a0.h1", "attn_head", 0, head=1, hook="blocks.0.attn.hook_result")
    assert g.node("m1").hook == "blocks.1.hook_mlp_out" and g.node("logits").hook == "ln_final.hook_in"
    assert g.meta["mlp_in_hooks"] == {"0": "blocks.0.ln2.hook_in", "1": "blocks.1.ln2.hook_in"}
    # every edge into a receiver input comes from earlier senders, in residual order
    order = {s: i for i, s in enumerate(g.senders)}
    for r in ("a1.h2", "m1", "logits"):
        for inp in (("q", "k", "v") if r.startswith("a") else (None,)):
            senders = [order[g.edges[i].sender] for i in g.incoming(r, inp)]
            assert senders == list(range(len(senders)))


def test_llama_and_native_graphs():
    g = ComponentGraph.from_model(llama_bridge())
    assert "pos_embed" not in g.node_index  # rotary positions: no position embedding node
    assert g.n_edges == expected_edges(2, 4, 1, {0, 1}) and g.meta["qkv_paths"] == ["projected", "split"]
    n = ComponentGraph.from_model(native_bridge(n_layers=3, n_heads=2))
    assert n.meta["qkv_paths"] == ["projected"] and n.supports_edges
    assert n.n_edges == expected_edges(3, 2, 2, {0, 1, 2})
    a = ComponentGraph.from_model(native_bridge(attn_only=True))
    assert not any(x.kind == "mlp" for x in a.nodes) and a.n_edges == expected_edges(2, 4, 2, set())


def test_zeroed_mlp_and_attn_only_flag_skip_mlps():
    m = gpt2_bridge(zero_mlp=(0,))
    g = ComponentGraph.from_model(m)
    assert "m0" not in g.node_index and "m1" in g.node_index
    assert "identically zero" in g.meta["skipped_mlps"]["0"]
    assert g.n_edges == expected_edges(2, 4, 2, {1})
    m.original_model.config.circuitexplain_attn_only = True
    g2 = ComponentGraph.from_model(m)
    assert not any(x.kind == "mlp" for x in g2.nodes)


def test_neurons_are_nodes_not_edge_ends(gpt2):
    g = ComponentGraph.from_model(gpt2, neurons=True)
    d_mlp = gpt2.cfg.d_mlp
    assert g.n_neurons == 2 * d_mlp
    assert g.node(f"m1.n{d_mlp - 1}") == Node(f"m1.n{d_mlp - 1}", "neuron", 1, index=d_mlp - 1,
                                               hook="blocks.1.mlp.hook_post")
    assert g.n_edges == ComponentGraph.from_model(gpt2).n_edges
    assert not any(".n" in e.sender or ".n" in e.receiver for e in g.edges)


def test_recurrent_models_are_node_level_only_and_gqa_models_get_edges():
    m = mamba_bridge()
    g = ComponentGraph.from_model(m)
    assert [n.id for n in g.nodes] == ["embed", "b0", "b1", "logits"]
    assert not g.supports_edges and g.n_edges == 0 and "recurrent" in g.meta["edge_reason"]
    batch = random_batch()
    with pytest.raises(ValueError, match="node-level"):
        EdgePatcher(m, g, batch)
    with pytest.raises(ValueError, match="node-level"):
        eap(m, g, batch)
    # grouped-query attention is ungrouped for edge runs (tests/test_gqa.py): one k/v input per query head
    gq = ComponentGraph.from_model(llama_bridge(n_heads=4, n_kv_heads=2))
    assert gq.supports_edges and gq.meta["n_kv_heads"] == 2 and gq.meta["edge_reason"] == ""
    assert sum(n.kind == "attn_head" for n in gq.nodes) == 8 and gq.n_edges == expected_edges(2, 4, 1, {0, 1})


def test_graph_round_trip_and_edge_ids(gpt2):
    g = ComponentGraph.from_model(gpt2)
    g2 = ComponentGraph.from_dict(g.to_dict())
    assert g2.nodes == g.nodes and g2.edges == g.edges and g2.edge_index == g.edge_index
    assert Edge.parse("a0.h1->a1.h2<k>") == Edge("a0.h1", "a1.h2", "k")
    assert Edge.parse("m0->logits").id == "m0->logits"
    with pytest.raises(ValueError, match="input"):
        Edge.parse("a0.h1->a1.h2<x>")
    with pytest.raises(KeyError, match="unknown edge"):
        g.edge_mask(["a0.h1->a0.h2<q>"])
    assert g.edge_mask(["m0->logits"]).sum() == 1


# ---- the hook facts the receivers rely on (verified, not assumed) -----------------------------

def _cache_with(model, toks, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model.run_with_cache(toks)


@pytest.mark.parametrize("build", [gpt2_bridge, llama_bridge])
def test_receiver_hooks_change_only_their_branch(build):
    m = build()
    m.set_use_split_qkv_input(True)
    toks = random_batch(B=2, P=6).clean
    logits, c = _cache_with(m, toks, [])
    delta = torch.randn(m.cfg.d_model)
    # ln2.hook_in: the MLP input moves, the residual stream does not
    _, c2 = _cache_with(m, toks, [("blocks.0.ln2.hook_in", lambda x, hook: x + delta)])
    assert (c2["blocks.0.mlp.hook_in"] - c["blocks.0.mlp.hook_in"]).abs().max() > 1e-3
    resid = lambda cc: cc["blocks.0.hook_resid_post"] - cc["blocks.0.hook_mlp_out"]  # noqa: E731
    assert torch.allclose(resid(c2), resid(c), atol=1e-6)
    # ln_final.hook_in: only the logits see the change
    l3, c3 = _cache_with(m, toks, [("ln_final.hook_in", lambda x, hook: x + delta)])
    assert torch.allclose(c3["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"])
    with torch.no_grad():
        assert torch.allclose(l3, m.unembed(m.ln_final(c["blocks.1.hook_resid_post"] + delta)), atol=1e-5)
    assert (l3 - logits).abs().max() > 1e-3
    # hook_k_input of head 2 in layer 1: only that head's keys move
    def head2(x, hook):
        x = x.clone()
        x[:, :, 2] += delta
        return x
    _, c4 = _cache_with(m, toks, [("blocks.1.attn.hook_k_input", head2)])
    moved = (c4["blocks.1.attn.hook_k"] - c["blocks.1.attn.hook_k"]).abs().amax(dim=(0, 1, 3))
    assert moved[2] > 1e-4 and moved[[0, 1, 3]].max() == 0
    assert torch.equal(c4["blocks.1.attn.hook_q"], c["blocks.1.attn.hook_q"])
    m.set_use_split_qkv_input(False)
