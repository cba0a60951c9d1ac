"""The explainers behind ``explain --explainer vocab|self`` (explainers/unit_explainers.py): direct-path input
tokens against the model's own forward on one-token inputs (exact at layer 0), against H4's neuron oracle and the
HF MLP module; the vocabulary explanation's parts; and the unit selection helpers of evals/explain_run.py."""

from __future__ import annotations

import pytest
import torch

from explainers.unit_explainers import direct_path_scores, render_tokens, vocab_explanations
from explainers.vocab import _raw, logit_lens, neuron_input_tokens


def one_token_acts(m, hook):
    """The hook's activation at position 0 of every one-token input (no BOS: the token attends to itself)."""
    V = m.W_E.shape[0]
    toks = torch.arange(V)[:, None]
    _, cache = m.run_with_cache(toks, names_filter=[hook])
    return cache[hook][:, 0].reshape(V, -1).double()


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"])
def test_direct_path_is_exact_at_layer_0(zoo_model, hook):
    m = zoo_model("ioi-2l")
    x = one_token_acts(m, hook)
    torch.manual_seed(1)
    r = torch.randn(x.shape[1])
    got = direct_path_scores(m, hook, r)
    assert torch.allclose(got.double(), x @ r.double(), atol=1e-4)


def test_direct_path_through_the_mlp(zoo_model):
    m = zoo_model("ioi-2l")
    r = torch.zeros(m.W_in.shape[-1])
    r[7] = 1.0
    got = direct_path_scores(m, "blocks.1.mlp.hook_post", r)
    ref = neuron_input_tokens(m, 1, 7, k=5)
    assert torch.topk(got, 5).indices.tolist() == list(ref.ids)
    assert torch.allclose(torch.topk(got, 5).values, torch.tensor(ref.weights), atol=1e-5)
    # hook_mlp_out: the model's own (HF) MLP module on ln2 of the embeddings
    q = torch.randn(m.cfg.d_model)
    blk = m.blocks[1]
    with torch.no_grad():
        want = _raw(blk.mlp)(_raw(blk.ln2)(m.W_E.detach())) @ q
    assert torch.allclose(direct_path_scores(m, "blocks.1.hook_mlp_out", q), want, atol=1e-4)
    with pytest.raises(ValueError, match="no direct path"):
        direct_path_scores(m, "blocks.1.attn.hook_pattern", q)


def test_vocab_explanations_of_each_basis_kind(zoo_model):
    from explainers.bases import DirectionBasis, HeadBasis, NeuronBasis

    m = zoo_model("ioi-2l")
    ex = vocab_explanations(m, NeuronBasis.from_model(m, 1), [7], ["m1.n7"], k=5)["m1.n7"]
    ref = neuron_input_tokens(m, 1, 7, k=5)
    assert ex.tokens == ref.tokens and ex.text == render_tokens(ref.tokens) and ex.explainer == "vocab"
    lens = logit_lens(m, m.W_out[1, 7], k=5)
    assert [t for t, _ in ex.meta["promotes"]] == list(lens.promoted.tokens)
    head = vocab_explanations(m, HeadBasis.from_model(m, 1), [2], ["a1.h2"], k=5)["a1.h2"]
    assert head.tokens == tuple(dict.fromkeys(p[0] for p in head.meta["ov_pairs"]))
    from explainers.vocab import ov_circuit

    assert head.meta["ov_pairs"] == [list(p) for p in ov_circuit(m, 1, 2, k=5).pairs]
    torch.manual_seed(0)
    basis = DirectionBasis.pca(torch.randn(200, m.cfg.d_model), 2, "blocks.0.hook_resid_post")
    d = vocab_explanations(m, basis, [1], ["d0.1@0.resid_post"], k=4)["d0.1@0.resid_post"]
    want = torch.topk(m.W_E.detach() @ basis.W_enc[:, 1], 4).indices.tolist()
    assert d.tokens == tuple(m.tokenizer.decode([t]) for t in want)
    assert render_tokens([" a", "a", ",", " "]) == "a, ',', ' '"


def test_node_importance_and_unit_nodes():
    from evals.explain_run import node_importance, resolve_selection, unit_node
    from graphs import circuit

    G = circuit.new_circuit(model="x", task="t", method="m", ablation="zero", metric="kl", seed=0)
    for n, kind, kw in (("a0.h0", "attn_head", {"head": 0}), ("m0", "mlp", {}), ("m0.n3", "neuron", {"index": 3}),
                        ("a1.h1", "attn_head", {"head": 1})):
        circuit.add_component(G, n, kind=kind, layer=int(n[1]), in_circuit=n != "m0.n3", **kw)
    circuit.add_component(G, "logits", kind="logits", layer=None)
    circuit.add_connection(G, "a0.h0", "a1.h1", input="v", score=-2.0)
    circuit.add_connection(G, "m0", "logits", score=0.5)
    circuit.add_connection(G, "a1.h1", "logits", score=1.0)
    circuit.add_connection(G, "m0.n3", "logits", score=4.0, in_circuit=False)
    G.nodes["a0.h0"]["score"] = 0.1                 # a node score wins over its edges
    assert node_importance(G) == [("a1.h1", 3.0), ("m0", 0.5), ("a0.h0", 0.1)]
    assert node_importance(G, all_nodes=True) == [("m0.n3", 4.0), ("a1.h1", 3.0), ("m0", 0.5), ("a0.h0", 0.1)]
    assert resolve_selection(G, "neuron", ()).nodes == ("a1.h1", "m0", "a0.h0")
    assert unit_node("m0.n3", G) == "m0.n3" and unit_node("m0.n9", G) == "m0" and unit_node("a1.h1", G) == "a1.h1"
    assert unit_node("m5.n1", G) == "" and unit_node("m0.n9", None) == ""
    sel = resolve_selection(G, "direction", ["m0", "a1.h1", "d1.0@1.attn.z"])
    assert sel.nodes == ("m0", "a1.h1") and sel.units == ("d1.0@1.attn.z",)
    with pytest.raises(ValueError, match="--units: unit id 'x1' not understood"):
        resolve_selection(G, "neuron", ["x1"])
    with pytest.raises(ValueError, match="features need --basis"):
        resolve_selection(G, "feature", ["f1.2"])
    assert resolve_selection(G, "feature", ["f1.2"], basis_hook="blocks.1.hook_resid_post").units == \
        ("f1.2@1.resid_post",)


def test_explanation_without_marker_skips_a_fragment_cut_at_max_tokens():
    from explainers.llm import prompts

    cut = ("The neuron in this example is a simple network. It has one output.\n\n"
           "The neuron in this example has a single output output, which")   # a real SmolLM2 reply, cut
    assert prompts.parse_explanation(cut) == "The neuron in this example is a simple network"
    assert prompts.parse_explanation("The neuron is a detector of quotes. It has a set of") == \
        "The neuron is a detector of quotes"
    assert prompts.parse_explanation("Reasoning first.\nfinal answer without a full stop") == "Reasoning first"
    assert prompts.parse_explanation("only a fragment") == "only a fragment"
    assert prompts.parse_explanation("blah\n[EXPLANATION]: Names of people. More text") == "Names of people"
