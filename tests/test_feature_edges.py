"""Feature-edge scores: exact feature-edge patching against hand-written hooks, EAP / EAP-IG equal to it on a
linearised model (attention patterns and MLP gates frozen, no norms, SAE encoders without activation)."""

import pytest
import torch
from helpers_features import freeze_hooks, random_basis
from helpers_models import native_bridge, random_batch

from patching.features import FeatureGraph
from patching.features_attr import feature_edge_scores

D = 32
R0, M0, M1 = "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def model():
    return native_bridge(normalization_type=None, act_fn="relu", seed=3)


@pytest.fixture(scope="module")
def batch():
    return random_batch(B=4, P=6, ragged=False, seed=1)


def sites(act):
    return {R0: random_basis(R0, D, 64, seed=1, act=act), M1: random_basis(M1, D, 64, seed=2, act=act),
            M0: random_basis(M0, D, 64, seed=3, act=act)}


def logit_diff(model, batch, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        lg = model(batch.clean)[torch.arange(len(batch)), batch.pos]
    return lg[torch.arange(len(batch)), batch.answer] - lg[torch.arange(len(batch)), batch.wrong]


def capture(model, tokens, hook, hooks=()):
    seen = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, (hook, lambda x, hook: seen.__setitem__("x", x.clone()))]):
        model(tokens)
    return seen["x"]


def test_exact_edge_patching_equals_hand_written_hooks(model, batch):
    """Edge f@resid_post0 -> f@mlp_out1 and err@mlp_out0 -> ..., with the real nonlinear model and ReLU SAEs."""
    bases = sites("relu")
    fg = FeatureGraph.build(model, bases, batch, max_features_per_site=4)
    scores = feature_edge_scores(model, fg, batch, method="patch", ablation="resample").as_dict()
    clean = logit_diff(model, batch, [])
    xs = {h: capture(model, batch.clean, h) for h in (R0, M0, M1)}
    xc = {h: capture(model, batch.corrupt, h) for h in (R0, M0, M1)}
    for u_hook, u_idx, d_idx in ((R0, fg.sites[1].candidates[2], fg.sites[2].candidates[1]), (R0, None, fg.sites[2].candidates[0])):
        bu, bd = bases[u_hook], bases[M1]
        if u_idx is None:  # the error node
            delta = (xc[u_hook] - bu.decode(bu.encode(xc[u_hook]))) - (xs[u_hook] - bu.decode(bu.encode(xs[u_hook])))
        else:
            delta = (bu.encode(xc[u_hook])[..., u_idx] - bu.encode(xs[u_hook])[..., u_idx])[..., None] * bu.W_dec[u_idx]
        x_new = capture(model, batch.clean, M1, [(u_hook, lambda x, hook, _d=delta: x + _d)])
        d_new, d_old = bd.encode(x_new)[..., d_idx], bd.encode(xs[M1])[..., d_idx]
        change = (d_new - d_old)[..., None] * bd.W_dec[d_idx]
        m = logit_diff(model, batch, [(M1, lambda x, hook, _c=change: x + _c)])
        u_id = "err@0.resid_post" if u_idx is None else f"f0.{u_idx}@0.resid_post"
        got = scores[f"{u_id}->f1.{d_idx}@1.mlp_out"]
        assert abs(got - float((m - clean).mean())) < 1e-5
    # to the logits: mlp_out1 (the only site after resid_post0) held clean
    u_idx = fg.sites[1].candidates[0]
    bu = bases[R0]
    delta = (bu.encode(xc[R0])[..., u_idx] - bu.encode(xs[R0])[..., u_idx])[..., None] * bu.W_dec[u_idx]
    m = logit_diff(model, batch, [(R0, lambda x, hook: x + delta), (M1, lambda x, hook: xs[M1])])
    assert abs(scores[f"f0.{u_idx}@0.resid_post->logits"] - float((m - clean).mean())) < 1e-5
    # mlp_out0 -> resid_post0: nothing in between; d recomputed with its ReLU encoder
    assert all(e.receiver.endswith("@0.resid_post") for e in fg.edges if e.sender.endswith("@0.mlp_out"))


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_eap_equals_exact_edge_patching_on_a_linearised_model(model, batch, ablation):
    fg = FeatureGraph.build(model, sites("none"), batch, max_features_per_site=4)
    with model.hooks(fwd_hooks=freeze_hooks(model, batch.clean)):
        exact = feature_edge_scores(model, fg, batch, method="patch", ablation=ablation)
        eap = feature_edge_scores(model, fg, batch, method="eap", ablation=ablation)
        ig = feature_edge_scores(model, fg, batch, method="eap-ig", ablation=ablation, steps=3)
        ig_j = feature_edge_scores(model, fg, batch, method="eap-ig", ablation=ablation, steps=3,
                                   integrate_jacobian=True)
    assert exact.level == "feature-edge" and exact.ids == fg.edge_ids
    assert float(exact.values.abs().max()) > 0.05 and int((exact.values.abs() > 1e-3).sum()) > 10
    torch.testing.assert_close(eap.values, exact.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ig.values, exact.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ig_j.values, exact.values, atol=1e-4, rtol=1e-4)


def test_eap_tracks_exact_patching_on_the_real_model(model, batch):
    fg = FeatureGraph.build(model, sites("relu"), batch, max_features_per_site=4)
    exact = feature_edge_scores(model, fg, batch, method="patch", ablation="resample")
    eap = feature_edge_scores(model, fg, batch, method="eap", ablation="resample")
    assert not torch.allclose(eap.values, exact.values, atol=1e-4)
    assert float(torch.corrcoef(torch.stack([eap.values, exact.values]))[0, 1]) > 0.9


def test_eap_does_not_depend_on_chunks_or_prompt_batches(model, batch):
    fg = FeatureGraph.build(model, sites("relu"), batch, max_features_per_site=4)
    ref = feature_edge_scores(model, fg, batch, method="eap-ig", ablation="mean", steps=2)
    ref_j = feature_edge_scores(model, fg, batch, method="eap-ig", ablation="mean", steps=2, integrate_jacobian=True)
    assert not torch.allclose(ref.values, ref_j.values, atol=1e-5)  # the real model is not linear
    for kw in ({"chunk": 1}, {"prompt_batch": 3}, {"chunk": 3, "prompt_batch": 1}):
        got = feature_edge_scores(model, fg, batch, method="eap-ig", ablation="mean", steps=2, **kw)
        torch.testing.assert_close(got.values, ref.values, atol=1e-5, rtol=1e-5)
        got = feature_edge_scores(model, fg, batch, method="eap-ig", ablation="mean", steps=2,
                                  integrate_jacobian=True, **kw)
        torch.testing.assert_close(got.values, ref_j.values, atol=1e-5, rtol=1e-5)
    one = feature_edge_scores(model, fg, batch, method="eap-ig", ablation="mean", steps=1)
    eap = feature_edge_scores(model, fg, batch, method="eap", ablation="mean")
    torch.testing.assert_close(one.values, eap.values, atol=1e-6, rtol=1e-6)


def test_edge_methods_refuse_bad_requests(model, batch):
    fg = FeatureGraph.build(model, sites("relu"), batch, max_features_per_site=2)
    with pytest.raises(ValueError, match="unknown method 'acdc'"):
        feature_edge_scores(model, fg, batch, method="acdc")
    with pytest.raises(ValueError, match="accuracy"):
        feature_edge_scores(model, fg, batch, method="eap", metric="accuracy")


def test_gpt2_style_model_end_to_end():
    """LayerNorm, learned positions, GELU, biases: the unablated run is the clean one, suffix runs equal whole
    forwards, EAP tracks exact edge patching."""
    from helpers_models import gpt2_bridge

    from patching.features import FeaturePatcher

    m = gpt2_bridge(n_layers=2, seed=4)
    b = random_batch(B=4, P=6, ragged=True, seed=3)
    bases = {R0: random_basis(R0, D, 64, seed=1), M1: random_basis(M1, D, 64, seed=2)}
    fg = FeatureGraph.build(m, bases, b, max_features_per_site=4)
    pt = FeaturePatcher(m, fg, b, ablation="resample")
    with torch.no_grad():
        clean = m(b.clean)[torch.arange(4), b.pos]
    expect = clean[torch.arange(4), b.answer] - clean[torch.arange(4), b.wrong]
    torch.testing.assert_close(pt.run(torch.zeros(1, fg.n_nodes, dtype=torch.bool))[0], expect, atol=1e-5, rtol=1e-5)
    masks = torch.eye(fg.n_nodes, dtype=torch.bool)[:-1]
    slow = FeaturePatcher(m, fg, b, ablation="resample", suffix=False)
    torch.testing.assert_close(pt.run(masks), slow.run(masks), atol=1e-5, rtol=1e-5)
    exact = feature_edge_scores(m, fg, b, method="patch", ablation="resample")
    eap = feature_edge_scores(m, fg, b, method="eap", ablation="resample")
    # feature senders (small deltas); a random SAE's error term is most of the residual stream, a change
    # too large for a first-order estimate through LayerNorm
    feat = torch.tensor([not e.sender.startswith("err@") for e in fg.edges])
    assert float(torch.corrcoef(torch.stack([eap.values[feat], exact.values[feat]]))[0, 1]) > 0.9
