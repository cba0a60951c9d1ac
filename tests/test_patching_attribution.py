"""AtP, EAP and EAP-IG against exact patching: equal where the model is linear, correlated on ioi-2l."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers_models import gpt2_bridge, native_bridge, random_batch
from scipy.stats import spearmanr

from patching import ComponentGraph, atp, eap, eap_ig, edge_patching_scores, node_patching_scores

log = logging.getLogger(__name__)
IOI = Path(__file__).resolve().parents[1] / "circuits" / "zoo" / "checkpoints" / "ioi-2l" / "model.safetensors"
BATCH = random_batch(B=5, P=8, seed=3)


@pytest.fixture(scope="module")
def linear():
    """A boot_native model whose metric is exactly affine in every receiver input: no layer norm, identity
    MLP activation, attention patterns frozen to the clean run's by a hook (q/k inputs then have no effect),
    logit difference metric. Returns (model, hooks that freeze the patterns)."""
    m = native_bridge(normalization_type=None, n_layers=2, d_model=32, n_heads=4, seed=7)
    with torch.no_grad():
        m.unembed.original_component.weight.mul_(10.0)  # effects of order one
    for block in m.blocks:
        block.mlp.original_component.act = lambda x: x
    with torch.no_grad():
        _, cache = m.run_with_cache(BATCH.clean)
    frozen = [cache[f"blocks.{L}.attn.hook_pattern"] for L in range(2)]
    B = BATCH.clean.shape[0]
    hooks = [(f"blocks.{L}.attn.hook_pattern",
              lambda p, hook, f=frozen[L]: f.repeat(p.shape[0] // B, 1, 1, 1)) for L in range(2)]
    return m, hooks


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_eap_and_eap_ig_equal_exact_on_linear_model(linear, ablation):
    m, freeze = linear
    g = ComponentGraph.from_model(m)
    with m.hooks(fwd_hooks=freeze):
        exact = edge_patching_scores(m, g, BATCH, ablation=ablation)
        est = eap(m, g, BATCH, ablation=ablation)
        ig = eap_ig(m, g, BATCH, ablation=ablation, steps=3)
    assert exact.values.abs().max() > 0.3
    assert torch.allclose(est.values, exact.values, atol=1e-4), (est.values - exact.values).abs().max()
    assert torch.allclose(ig.values, exact.values, atol=1e-4)
    assert est.ids == exact.ids and est.method == "eap" and ig.method == "eap_ig"
    qk = torch.tensor([e.input in ("q", "k") for e in g.edges])
    assert exact.values[qk].abs().max() < 1e-5  # frozen patterns: q and k edges do nothing


@pytest.mark.parametrize("level", ["node", "neuron"])
def test_atp_equals_exact_on_linear_model(linear, level):
    m, freeze = linear
    g = ComponentGraph.from_model(m, neurons=True)
    with m.hooks(fwd_hooks=freeze):
        exact = node_patching_scores(m, g, BATCH, ablation="resample", level=level)
        est = atp(m, g, BATCH, ablation="resample", level=level)
    assert exact.values.abs().max() > 0.05
    assert torch.allclose(est.values, exact.values, atol=1e-4)
    assert est.ids == exact.ids and est.forward_passes == 2  # one forward+backward, one corrupted forward


def test_attribution_is_only_approximate_on_a_nonlinear_model():
    m = gpt2_bridge(seed=2)
    g = ComponentGraph.from_model(m)
    exact = edge_patching_scores(m, g, BATCH)
    est = eap(m, g, BATCH)
    one = eap_ig(m, g, BATCH, steps=1)
    assert torch.equal(one.values, est.values)  # steps=1 is EAP
    assert (est.values - exact.values).abs().max() > 1e-3  # the linear-model test above can fail
    assert spearmanr(est.values, exact.values)[0] > 0.5
    assert est.forward_passes == 2


def test_eap_ig_correlates_with_exact_on_ioi():
    """Spearman between EAP-IG and exact edge patching over the 100 edges of largest exact |score|.

    Ranks are of |score| (how discovery selects edges); the signed correlation over the same edges is
    printed too: on ioi-2l many weak edges have small exact effects whose sign EAP-IG gets wrong, so the
    signed figure over 100 of 110 edges is lower (0.51 against 0.86). The strongest 20 edges must agree
    with signs."""
    if not IOI.is_file():
        pytest.fail("zoo model ioi-2l not trained yet")
    from circuits.models import load_model, load_tokenizer
    from circuits.tasks import get_task

    model = load_model("ioi-2l", device="cpu")
    batch = get_task("ioi", n=32, seed=2).batch(load_tokenizer("ioi-2l"))
    g = ComponentGraph.from_model(model)
    exact = edge_patching_scores(model, g, batch, ablation="resample")
    ig = eap_ig(model, g, batch, ablation="resample", steps=5)
    top = torch.argsort(exact.values.abs(), descending=True)[:100]
    rho = spearmanr(ig.values[top].abs(), exact.values[top].abs())[0]
    signed = spearmanr(ig.values[top], exact.values[top])[0]
    signed20 = spearmanr(ig.values[top[:20]], exact.values[top[:20]])[0]
    rho_eap = spearmanr(eap(model, g, batch).values[top].abs(), exact.values[top].abs())[0]
    print(f"\nioi-2l, top {len(top)} of {g.n_edges} edges by exact |score|: Spearman(|EAP-IG|, |exact|) = {rho:.3f} "
          f"(|EAP|: {rho_eap:.3f}); signed: {signed:.3f}, signed over the top 20: {signed20:.3f}")
    log.info("ioi-2l Spearman |EAP-IG| %.3f |EAP| %.3f signed %.3f top-20 signed %.3f", rho, rho_eap, signed,
             signed20)
    assert rho >= 0.8
    assert signed20 >= 0.8


def hand_eap_ig(model, graph, batch, steps):
    """EAP-IG written out by hand with TransformerLens' split hooks: senders from hook_result / hook_mlp_out /
    embeddings, receiver gradients by retain_grad on hook_{q,k,v}_input, ln2.hook_in and ln_final.hook_in,
    embeddings interpolated from the corrupted to the clean ones at a = k/steps, k = 1..steps."""
    L_n = model.cfg.n_layers
    outs = ["hook_embed", "hook_pos_embed"] + [f"blocks.{L}.attn.hook_result" for L in range(L_n)] + \
        [f"blocks.{L}.hook_mlp_out" for L in range(L_n)]
    ins = [f"blocks.{L}.attn.hook_{x}_input" for L in range(L_n) for x in "qkv"] + \
        [f"blocks.{L}.ln2.hook_in" for L in range(L_n)] + ["ln_final.hook_in"]
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean = model.run_with_cache(batch.clean, names_filter=outs)
            _, corr = model.run_with_cache(batch.corrupt, names_filter=outs)
        grads = {n: 0.0 for n in ins}
        for k in range(1, steps + 1):
            a = k / steps
            saved = {}

            def keep(x, hook, saved=saved):  # a new tensor: ln2.hook_in's input is also the residual stream's
                y = x.clone()
                y.retain_grad()
                saved[hook.name] = y
                return y

            hooks = [(e, lambda x, hook, e=e, a=a: (corr[e] + a * (clean[e] - corr[e])).requires_grad_())
                     for e in ("hook_embed", "hook_pos_embed")]
            hooks += [(n, keep) for n in ins]
            with model.hooks(fwd_hooks=hooks):
                logits = model(batch.clean)
            logits_at = logits[torch.arange(len(batch.pos)), batch.pos]
            (logits_at.gather(-1, batch.answer[:, None]) - logits_at.gather(-1, batch.wrong[:, None])).sum().backward()
            model.zero_grad(set_to_none=True)
            for n in ins:
                grads[n] = grads[n] + saved[n].grad / steps
    finally:
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)

    def sender_diff(s):
        if s in ("embed", "pos_embed"):
            return corr[f"hook_{s}"] - clean[f"hook_{s}"]
        L = int(s[1:].split(".")[0])
        if s.startswith("m"):
            return corr[f"blocks.{L}.hook_mlp_out"] - clean[f"blocks.{L}.hook_mlp_out"]
        h = int(s.split(".h")[1])
        return corr[f"blocks.{L}.attn.hook_result"][:, :, h] - clean[f"blocks.{L}.attn.hook_result"][:, :, h]

    values = []
    for e in graph.edges:
        r = graph.node(e.receiver)
        if r.kind == "attn_head":
            g = grads[f"blocks.{r.layer}.attn.hook_{e.input}_input"][:, :, r.head]
        elif r.kind == "mlp":
            g = grads[f"blocks.{r.layer}.ln2.hook_in"]
        else:
            g = grads["ln_final.hook_in"]
        values.append(float((sender_diff(e.sender) * g).sum() / len(batch.pos)))
    return torch.tensor(values)


def test_eap_ig_matches_hand_written_integrated_gradients():
    m = gpt2_bridge(seed=4)
    g = ComponentGraph.from_model(m)
    want = hand_eap_ig(m, g, BATCH, steps=3)
    got = eap_ig(m, g, BATCH, steps=3)
    assert want.abs().max() > 0.05
    assert torch.allclose(got.values, want, atol=2e-5), (got.values - want).abs().max()
    assert not torch.allclose(got.values, eap(m, g, BATCH).values, atol=1e-3)  # the interpolation matters


def test_atp_on_recurrent_blocks_and_scores_round_trip():
    from helpers_models import mamba_bridge

    from patching.scores import Scores

    m = mamba_bridge()
    g = ComponentGraph.from_model(m)
    est = atp(m, g, BATCH, ablation="resample")
    exact = node_patching_scores(m, g, BATCH, ablation="resample")
    assert est.ids == exact.ids == ("embed", "b0", "b1", "logits")
    assert torch.isfinite(est.values).all() and est.values[-1] == 0 and exact.values[-1] == 0
    # the last block's contribution feeds only the final norm and unembedding: AtP's linearisation is
    # close there, and it has the sign of the exact effect
    assert torch.sign(est.values[2]) == torch.sign(exact.values[2])
    back = Scores.from_dict(exact.to_dict())
    assert back.ids == exact.ids and torch.allclose(back.values, exact.values) and back.graph.nodes == g.nodes
    assert exact.top(1)[0][0] == exact.ids[int(exact.values.abs().argmax())]
