"""AtP*'s QK fix (patching/qkfix.py): exact where the model is linear after the attention pattern, and what it buys
on the induction zoo model, whose saturated attention defeats plain EAP / EAP-IG on the key edges."""

from __future__ import annotations

import pytest
import torch
from helpers_models import llama_bridge, native_bridge, random_batch
from scipy.stats import spearmanr
from test_gqa import gqa_pair

from patching import ComponentGraph, atp, eap, eap_ig, edge_patching_scores

BATCH = random_batch(B=5, P=8, seed=5)


@pytest.fixture(scope="module")
def linear_after_pattern():
    """Two attention-only layers, no norms: everything after layer 1's pattern (z = A v, W_O, the unembedding,
    the logit difference) is linear, so a q/k edge into layer 1 changes the metric by exactly grad_A . dA."""
    m = native_bridge(normalization_type=None, attn_only=True, n_layers=2, d_model=32, n_heads=4, seed=11)
    with torch.no_grad():
        for blk in m.blocks:  # larger attention logits: saturated patterns, where the linearised softmax fails
            blk.attn.q.original_component.weight.mul_(20.0)
        m.unembed.original_component.weight.mul_(30.0)  # effects of order 0.1
    return m


def test_qk_fix_is_exact_when_linear_after_the_pattern(linear_after_pattern):
    m = linear_after_pattern
    g = ComponentGraph.from_model(m)
    exact = edge_patching_scores(m, g, BATCH, ablation="resample")
    fixed = eap(m, g, BATCH, ablation="resample", qk_fix=True)
    plain = eap(m, g, BATCH, ablation="resample")
    into1 = torch.tensor([e.input in ("q", "k") and g.node(e.receiver).layer == 1 for e in g.edges])
    assert exact.values[into1].abs().max() > 0.1
    assert torch.allclose(fixed.values[into1], exact.values[into1], atol=1e-5), \
        float((fixed.values - exact.values)[into1].abs().max())
    assert (plain.values - exact.values)[into1].abs().max() > 0.03  # the softmax is far from linear here
    # edges into values, MLPs and logits keep their EAP scores; v and logits edges of layer 1 are exact for both
    qk = torch.tensor([e.input in ("q", "k") for e in g.edges])
    assert torch.equal(fixed.values[~qk], plain.values[~qk])
    v1 = torch.tensor([e.input == "v" and g.node(e.receiver).layer == 1 for e in g.edges])
    assert torch.allclose(plain.values[v1], exact.values[v1], atol=1e-4)
    assert fixed.method == "eap_qkfix" and fixed.forward_passes == plain.forward_passes


def test_qk_fix_on_gqa_equals_multi_head_model():
    gq, mha = gqa_pair(seed=3)
    g, g2 = ComponentGraph.from_model(gq), ComponentGraph.from_model(mha)
    for fn in (lambda m, gg: eap(m, gg, BATCH, qk_fix=True), lambda m, gg: eap_ig(m, gg, BATCH, steps=3, qk_fix=True)):
        a, b = fn(gq, g), fn(mha, g2)
        assert torch.allclose(a.values, b.values, atol=1e-5), float((a.values - b.values).abs().max())


def test_qk_fix_with_rotary_llama_and_prompt_batches():
    """Rotary embeddings (checked against hook_rot_q / hook_rot_k) and prompt batches: the scores are the same
    with one prompt batch or three."""
    m = llama_bridge(n_layers=2, seed=6)
    g = ComponentGraph.from_model(m)
    whole = eap_ig(m, g, BATCH, steps=2, qk_fix=True)
    parts = eap_ig(m, g, BATCH, steps=2, qk_fix=True, prompt_batch=2)
    assert torch.allclose(whole.values, parts.values, atol=1e-5)
    assert not torch.allclose(whole.values, eap_ig(m, g, BATCH, steps=2).values, atol=1e-4)


def test_node_level_atp_refuses_the_qk_fix():
    m = llama_bridge(n_layers=2)
    with pytest.raises(ValueError, match="atp: qk_fix applies to edge attribution"):
        atp(m, ComponentGraph.from_model(m), BATCH, qk_fix=True)


def test_unsupported_attention_is_a_one_line_error():
    m = native_bridge(positional_embedding_type="rotary", normalization_type="LN", seed=6)  # no cos/sin hooks
    g = ComponentGraph.from_model(m)
    with pytest.raises(ValueError, match="qk_fix: layer 0") as e:
        eap(m, g, BATCH, qk_fix=True)
    assert "\n" not in str(e.value)


def test_regression_qk_fix_lifts_induction_auc(zoo_model):
    """attn2l-induction, 32 prompts, resample ablation, edge AUC against the induction reference (measured):

    seed   EAP    EAP+QK   EAP-IG   EAP-IG+QK   exact
    0      0.909  0.955    0.851    0.974       0.994
    1      0.929  0.961    0.896    0.968       0.987
    2      0.903  0.961    0.922    0.955       0.981
    Spearman of |score| with exact patching, EAP-IG: 0.67 -> 0.96, 0.62 -> 0.90, 0.60 -> 0.95. The induction
    head's key edge a0.h0->a1.h0<k> (exact -8.5) scores -1.0 with EAP-IG and -6.5 with the fix (seed 0)."""
    from circuits.models import load_tokenizer
    from circuits.tasks import get_task
    from evals.ground_truth import edge_roc
    from evals.references import induction_reference

    m = zoo_model("attn2l-induction")
    g = ComponentGraph.from_model(m)
    for seed in (0, 1, 2):
        batch = get_task("induction", n=32, seed=seed).batch(load_tokenizer("attn2l-induction"))
        ref = induction_reference(m, g, batch)
        exact = edge_patching_scores(m, g, batch, ablation="resample")
        plain, fixed = eap_ig(m, g, batch), eap_ig(m, g, batch, qk_fix=True)
        auc = {k: edge_roc(s.ids, s.values.numpy(), ref).auc for k, s in (("plain", plain), ("fixed", fixed))}
        assert auc["fixed"] >= 0.95 and auc["fixed"] > auc["plain"], (seed, auc)
        assert edge_roc(exact.ids, exact.values.numpy(), ref).auc >= auc["fixed"]  # exact patching stays ahead
        rho = spearmanr(fixed.values.abs(), exact.values.abs())[0]
        assert rho > spearmanr(plain.values.abs(), exact.values.abs())[0] and rho > 0.9, (seed, rho)
