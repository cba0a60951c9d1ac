"""Vocabulary projections against the model's own modules (final norm + unembedding, the MLP on embeddings),
a brute-force OV matrix, and the IOI mechanism (layer-1 name movers copy names; layer-0 heads do not)."""

from __future__ import annotations

import pytest
import torch

from circuits.tasks.vocab import NAMES
from explainers import vocab


@pytest.mark.parametrize("name", ["ioi-2l", "ioi-2l-gpt2"])  # RMSNorm and LayerNorm (with bias)
def test_logit_lens_ranks_as_the_models_final_norm_and_unembedding(zoo_model, name):
    m = zoo_model(name)
    d = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    proj = vocab.logit_lens(m, d, k=20)
    with torch.no_grad():
        normed = m.ln_final(d[None])[0]
        inner = getattr(m.ln_final, "_original_component", m.ln_final)
        bias = getattr(inner, "bias", None)
        if bias is not None:  # LayerNorm's bias adds the same logits whatever d is: left out by design
            normed = normed - bias
        ref = normed @ m.W_U
    assert list(proj.promoted.ids) == torch.topk(ref, 20).indices.tolist()
    assert list(proj.suppressed.ids) == torch.topk(ref, 20, largest=False).indices.tolist()
    # the dropped 1/s(x) is one positive factor for all logits
    ratio = ref[list(proj.promoted.ids)] / torch.tensor(proj.promoted.weights)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert proj.promoted.tokens[0] == m.tokenizer.decode([proj.promoted.ids[0]])
    with pytest.raises(ValueError, match="d_model is 128"):
        vocab.logit_lens(m, torch.ones(5))


def test_neuron_input_tokens_match_the_mlp_module_on_embeddings(zoo_model):
    m = zoo_model("ioi-2l")  # gated SiLU MLP
    cap = []
    with torch.no_grad(), m.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", lambda a, hook=None: cap.append(a))]):
        m.blocks[1].mlp(m.blocks[1].ln2(m.W_E.detach()[None]))
    ref = cap[0][0, :, 7]
    tw = vocab.neuron_input_tokens(m, 1, 7, k=8)
    assert list(tw.ids) == torch.topk(ref, 8).indices.tolist()
    assert torch.allclose(torch.tensor(tw.weights), torch.topk(ref, 8).values, atol=1e-5)
    # a direction read from the raw residual: the plain embedding dot product
    r = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(1))
    assert list(vocab.input_tokens(m, r, k=5).ids) == torch.topk(m.W_E @ r, 5).indices.tolist()
    with pytest.raises(ValueError, match="m1.n9999 does not exist"):
        vocab.neuron_input_tokens(m, 1, 9999)


@pytest.mark.parametrize("name", ["ioi-2l", "ioi-2l-gpt2"])
def test_ov_circuit_matches_the_full_matrix(zoo_model, name):
    m = zoo_model(name)
    layer, head = 1, 2
    with torch.no_grad():
        # the HF norm module itself: the bridge's ln1 would record its input (a side effect on a shared model)
        out = m.blocks[layer].ln1._original_component(m.W_E.detach()) @ m.W_V[layer, head] @ m.W_O[layer, head]
        if m.cfg.normalization_type == "LN":
            out = out - out.mean(-1, keepdim=True)
        inner = getattr(m.ln_final, "_original_component", m.ln_final)
        full = (out * inner.weight) @ m.W_U  # [V, V]
    ov = vocab.ov_circuit(m, layer, head, k=5, chunk=100)
    best_vals, best_ids = full.max(-1)
    src = torch.topk(best_vals, 5).indices
    assert [p[0] for p in ov.pairs] == [m.tokenizer.decode([int(s)]) for s in src]
    assert [p[1] for p in ov.pairs] == [m.tokenizer.decode([int(best_ids[s])]) for s in src]
    assert ov.copying_score == pytest.approx(float((best_ids == torch.arange(full.shape[0])).float().mean()))
    assert list(ov.outputs.ids) == torch.topk(full.max(0).values, 5).indices.tolist()


def test_regression_ioi_name_movers_copy_names(zoo_model):
    """ioi-2l's answer is written by layer-1 heads that attend to a name and copy it: their OV circuits map
    most names to themselves; layer-0 heads map none (measured: a1.h0 0.56, a1.h2 0.72, layer 0 0.00)."""
    m = zoo_model("ioi-2l")
    ids = [m.tokenizer(" " + n, add_special_tokens=False)["input_ids"][0] for n in NAMES]
    copy = {(L, h): vocab.ov_circuit(m, L, h, sources=ids).copying_score for L in range(2) for h in range(4)}
    assert max(copy[(1, h)] for h in range(4)) >= 0.6
    assert max(copy[(0, h)] for h in range(4)) <= 0.05


def test_gqa_heads_use_their_value_head(smollm2):
    """SmolLM2 has 9 query and 3 value heads: head 4 reads value head 1; the source-restricted OV projection
    still ranks the tokens a brute-force product does."""
    ids = [smollm2.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" dog", " cat", " Paris", " red")]
    ov = vocab.ov_circuit(smollm2, 3, 4, k=4, sources=ids)
    assert ov.meta["value_head"] == 1
    with torch.no_grad():
        x = smollm2.blocks[3].ln1._original_component(smollm2.W_E[ids]) @ smollm2.W_V[3, 1] @ smollm2.W_O[3, 4]
        full = (x * smollm2.ln_final._original_component.weight) @ smollm2.W_U
    assert [p[1] for p in ov.pairs] == [smollm2.tokenizer.decode([int(full[i].argmax())])
                                        for i in torch.topk(full.max(-1).values, 4).indices]
    lens = vocab.logit_lens(smollm2, smollm2.W_E[ids[0]], k=5)
    assert "dog" in "".join(lens.promoted.tokens).lower()  # tied embeddings: a word's embedding promotes it
