"""Feature-circuit nodes: graph construction, node ablation semantics and node scores against oracles
(the engine's neuron / MLP patching through an identity basis, hand-written hooks, exactness on a linearised
model, the splice)."""

import pytest
import torch
from helpers_features import freeze_hooks, identity_basis, random_basis
from helpers_models import native_bridge, random_batch

from patching.exact import NodePatcher
from patching.features import FeatureGraph, FeaturePatcher, feature_node_scores, hook_short
from patching.graph import ComponentGraph
from patching.splice import splice

D = 32


@pytest.fixture(scope="module")
def model():
    return native_bridge(normalization_type=None, act_fn="relu", seed=3)


@pytest.fixture(scope="module")
def batch():
    return random_batch(B=4, P=6, ragged=False, seed=1)


def three_sites(act="relu"):
    return {"blocks.0.hook_resid_post": random_basis("blocks.0.hook_resid_post", D, 64, seed=1, name="r0", act=act),
            "blocks.1.hook_mlp_out": random_basis("blocks.1.hook_mlp_out", D, 64, seed=2, name="m1", act=act),
            "blocks.0.hook_mlp_out": random_basis("blocks.0.hook_mlp_out", D, 64, seed=3, name="m0", act=act)}


def observe(model, hook, tokens_fn):
    seen = {}
    with model.hooks(fwd_hooks=[(hook, lambda x, hook: seen.__setitem__("x", x.detach().clone()))]):
        tokens_fn()
    return seen["x"]


# ------------------------------------------------------------------------------------------------- graph
def test_graph_nodes_sites_and_direct_edges(model, batch):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=5)
    assert [s.hook for s in fg.sites] == ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    # mlp_out0 feeds resid_post0 only; resid_post0 feeds mlp_out1 and the logits; mlp_out1 the logits
    assert fg.direct == ((0, 1), (1, 2), (1, 3), (2, 3))
    assert fg.n_nodes == 3 * 6 + 1 and fg.ids[-1] == "logits"
    n = fg.node("err@0.resid_post")
    assert (n.kind, n.layer, n.index, n.sae, n.site) == ("error", 0, None, "r0", 1)
    # every edge by hand: 6 senders of site 0 -> 5 receivers of site 1, 6 of site 1 -> 5 of site 2, 12 -> logits
    assert fg.n_edges == 6 * 5 + 6 * 5 + 12
    assert not any(e.sender.endswith("@0.mlp_out") and e.receiver.endswith("@1.mlp_out") for e in fg.edges)
    again = FeatureGraph.from_dict(fg.to_dict(), bases=fg.bases)
    assert again.ids == fg.ids and again.edge_ids == fg.edge_ids and again.sites == fg.sites


def test_candidates_are_the_most_active_features(model, batch):
    hook = "blocks.0.hook_resid_post"
    b = random_basis(hook, D, 64, seed=1)
    fg = FeatureGraph.build(model, {hook: b}, batch, max_features_per_site=7)
    x = observe(model, hook, lambda: model(batch.clean))
    xr = observe(model, hook, lambda: model(batch.corrupt))
    w = (batch.clean != 0).float()[..., None]  # real non-BOS tokens (no padding in this batch)
    mass = (b.encode(x).abs() * w).sum((0, 1)) + (b.encode(xr).abs() * (batch.corrupt != 0).float()[..., None]).sum((0, 1))
    expect = sorted(torch.argsort(-mass, stable=True)[:7].tolist())
    assert list(fg.sites[0].candidates) == expect


def test_ids_follow_the_unit_vocabulary(model, batch):
    from explainers.units import hook_short as units_hook_short
    from explainers.units import parse_unit_id

    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=3)
    for h in ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"):
        assert hook_short(h) == units_hook_short(h)
    for n in fg.nodes[:-1]:
        u = parse_unit_id(n.id)
        assert (u.kind, u.layer, u.index, u.hook) == (n.kind, n.layer, n.index, n.hook)


def test_bad_sites_fail_in_one_line(model, batch):
    with pytest.raises(ValueError, match="no hook 'blocks.7.hook_resid_post'"):
        FeatureGraph.build(model, {"blocks.7.hook_resid_post": random_basis("blocks.7.hook_resid_post", D, 8)}, batch)
    with pytest.raises(ValueError, match="reads 'blocks.0.hook_mlp_out' but was given for hook"):
        FeatureGraph.build(model, {"blocks.0.hook_resid_post": random_basis("blocks.0.hook_mlp_out", D, 8)}, batch)
    with pytest.raises(ValueError, match="not a block hook"):
        FeatureGraph.build(model, {"hook_embed": random_basis("hook_embed", D, 8)}, batch)


# ---------------------------------------------------------------------------------------- ablation semantics
def test_unablated_run_is_the_clean_and_the_spliced_model(model, batch):
    sites = three_sites()
    fg = FeatureGraph.build(model, sites, batch, max_features_per_site=4)
    pt = FeaturePatcher(model, fg, batch, ablation="zero")
    got = pt.run_logits(torch.zeros(1, fg.n_nodes, dtype=torch.bool))[0]
    with splice(model, sites):
        spliced = model(batch.clean)[torch.arange(4), batch.pos]
    torch.testing.assert_close(got, model(batch.clean)[torch.arange(4), batch.pos].detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, spliced.detach(), atol=1e-5, rtol=0)


def test_error_nodes_carry_exactly_what_the_sae_misses(model, batch):
    hook = "blocks.0.hook_resid_post"
    b = random_basis(hook, D, 64, seed=5)
    fg = FeatureGraph.build(model, {hook: b}, batch, max_features_per_site=None)  # every active feature
    pt = FeaturePatcher(model, fg, batch, ablation="zero")
    x = observe(model, hook, lambda: model(batch.clean))
    u = b.encode(x)
    err = x - b.decode(u)
    assert float(err.abs().max()) > 0.1
    feats = fg.ablatable().clone()
    feats[fg.sites[0].error] = False
    only_err = torch.zeros_like(feats)
    only_err[fg.sites[0].error] = True
    for mask, expect in ((feats, err + b.b_dec), (only_err, b.decode(u))):
        seen = {}

        def after(x, hook, _seen=seen):  # block 1's input is the site's patched output
            _seen["x"] = x.detach().clone()
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", after)]):
            pt.run(mask.unsqueeze(0))
        torch.testing.assert_close(seen["x"], expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_identity_basis_features_are_the_engines_neurons(model, batch, ablation):
    hook = "blocks.0.mlp.hook_post"
    fg = FeatureGraph.build(model, {hook: identity_basis(hook, 2 * D)}, batch, max_features_per_site=None,
                            min_activation=-1.0)
    assert fg.sites[0].candidates == tuple(range(2 * D))
    graph = ComponentGraph.from_model(model, neurons=True)
    ref = NodePatcher(model, graph, batch, ablation=ablation, metric="logit_diff")
    pt = FeaturePatcher(model, fg, batch, ablation=ablation, metric="logit_diff")
    idx = [0, 5, 17, 63]
    ours = torch.zeros(len(idx) + 1, fg.n_nodes, dtype=torch.bool)
    theirs = torch.zeros(len(idx) + 1, graph.n_nodes, dtype=torch.bool)
    for k, i in enumerate(idx):
        ours[k, fg.node_index[f"f0.{i}@0.mlp.post"]] = True
        theirs[k, graph.node_index[f"m0.n{i}"]] = True
    ours[-1, :2 * D] = True          # every neuron of layer 0
    theirs[-1] = graph.node_mask([f"m0.n{i}" for i in range(2 * D)])
    torch.testing.assert_close(pt.run(ours), ref.run(theirs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pt.clean_metric, ref.clean_metric, atol=1e-5, rtol=1e-5)


def test_identity_basis_at_mlp_out_is_the_mlp_node(model, batch):
    hook = "blocks.1.hook_mlp_out"
    fg = FeatureGraph.build(model, {hook: identity_basis(hook, D)}, batch, max_features_per_site=None,
                            min_activation=-1.0)
    graph = ComponentGraph.from_model(model)
    ref = NodePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    pt = FeaturePatcher(model, fg, batch, ablation="resample", metric="logit_diff")
    feats = fg.ablatable().clone()
    feats[fg.sites[0].error] = False  # the identity basis has no error: features alone are the MLP
    torch.testing.assert_close(pt.run(feats[None]), ref.run(graph.node_mask(["m1"])[None]), atol=1e-5, rtol=1e-5)


def test_identity_basis_resid_feature_is_a_hand_written_residual_patch(model, batch):
    hook = "blocks.0.hook_resid_post"
    fg = FeatureGraph.build(model, {hook: identity_basis(hook, D)}, batch, max_features_per_site=None,
                            min_activation=-1.0)
    pt = FeaturePatcher(model, fg, batch, ablation="resample", metric="logit_diff")
    corrupt = observe(model, hook, lambda: model(batch.corrupt))

    def patch(x, hook):
        x = x.clone()
        x[..., 7] = corrupt[..., 7]
        return x
    with model.hooks(fwd_hooks=[(hook, patch)]):
        logits = model(batch.clean)[torch.arange(4), batch.pos]
    expect = logits[torch.arange(4), batch.answer] - logits[torch.arange(4), batch.wrong]
    got = pt.run(fg.node_mask(["f0.7@0.resid_post"])[None])[0]
    torch.testing.assert_close(got, expect.detach(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- node scores
@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_node_atp_is_exact_on_a_linearised_model(model, batch, ablation):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=6)
    with model.hooks(fwd_hooks=freeze_hooks(model, batch.clean)):
        exact = feature_node_scores(model, fg, batch, method="patch", ablation=ablation)
        atp = feature_node_scores(model, fg, batch, method="atp", ablation=ablation)
    assert exact.level == "feature" and exact.ids == fg.ids and float(exact.values.abs().max()) > 1e-2
    torch.testing.assert_close(atp.values, exact.values, atol=1e-4, rtol=1e-4)
    # IG's path moves every site's units, re-encoded: exact once the SAE encoders are linear too
    lin = FeatureGraph.build(model, three_sites(act="none"), batch, max_features_per_site=6)
    with model.hooks(fwd_hooks=freeze_hooks(model, batch.clean)):
        exact = feature_node_scores(model, lin, batch, method="patch", ablation=ablation)
        ig = feature_node_scores(model, lin, batch, method="ig", ablation=ablation, steps=3)
    torch.testing.assert_close(ig.values, exact.values, atol=1e-4, rtol=1e-4)


def test_node_atp_approximates_patching_on_the_real_model(model, batch):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=6)
    exact = feature_node_scores(model, fg, batch, method="patch", ablation="resample")
    atp = feature_node_scores(model, fg, batch, method="atp", ablation="resample")
    assert not torch.allclose(atp.values, exact.values, atol=1e-4)  # the real model is not linear
    assert float(torch.corrcoef(torch.stack([atp.values, exact.values]))[0, 1]) > 0.9


def test_per_position_scores_sum_to_the_node_scores(model, batch):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=3)
    with model.hooks(fwd_hooks=freeze_hooks(model, batch.clean)):
        per = feature_node_scores(model, fg, batch, method="patch", ablation="resample", per_position=True)
        atp = feature_node_scores(model, fg, batch, method="atp", ablation="resample", per_position=True)
        total = feature_node_scores(model, fg, batch, method="patch", ablation="resample")
    P = batch.clean.shape[1]
    assert per.ids[:2] == (f"{fg.ids[0]}[0]", f"{fg.ids[0]}[1]") and len(per.ids) == (fg.n_nodes - 1) * P
    torch.testing.assert_close(per.values.view(-1, P).sum(-1), total.values[:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(atp.values, per.values, atol=1e-4, rtol=1e-4)


def test_prompt_batches_do_not_change_scores(model, batch):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=4)
    for method in ("patch", "atp"):
        a = feature_node_scores(model, fg, batch, method=method, ablation="mean")
        b = feature_node_scores(model, fg, batch, method=method, ablation="mean", prompt_batch=3)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_gradient_methods_refuse_accuracy(model, batch):
    fg = FeatureGraph.build(model, three_sites(), batch, max_features_per_site=2)
    with pytest.raises(ValueError, match="accuracy"):
        feature_node_scores(model, fg, batch, method="atp", metric="accuracy")
    with pytest.raises(ValueError, match="unknown method"):
        feature_node_scores(model, fg, batch, method="acdc")


def test_identity_basis_at_hook_z_is_the_engines_head_node(model, batch):
    """hook_z is read flattened ([..., H * d_head]): head 1's d_head features together are the head."""
    hook = "blocks.1.attn.hook_z"
    fg = FeatureGraph.build(model, {hook: identity_basis(hook, D)}, batch, max_features_per_site=None,
                            min_activation=-1.0)
    graph = ComponentGraph.from_model(model)
    for ablation in ("mean", "resample"):
        ref = NodePatcher(model, graph, batch, ablation=ablation, metric="logit_diff")
        pt = FeaturePatcher(model, fg, batch, ablation=ablation, metric="logit_diff")
        dh = D // 4
        head1 = fg.node_mask([f"f1.{i}@1.attn.z" for i in range(dh, 2 * dh)])
        torch.testing.assert_close(pt.run(head1[None]), ref.run(graph.node_mask(["a1.h1"])[None]), atol=1e-5,
                                   rtol=1e-5)


def test_ragged_prompts_and_prompt_batches(model):
    """Right-padded prompts of different lengths: neuron equality through an identity basis under mean ablation
    (padding and BOS excluded from the mean), and node scores unchanged by prompt batches (trimmed per batch)."""
    ragged = random_batch(B=6, P=8, ragged=True, seed=4)
    assert int(ragged.pos.min()) < 7
    hook = "blocks.0.mlp.hook_post"
    fg = FeatureGraph.build(model, {hook: identity_basis(hook, 2 * D)}, ragged, max_features_per_site=None,
                            min_activation=-1.0)
    graph = ComponentGraph.from_model(model, neurons=True)
    ref = NodePatcher(model, graph, ragged, ablation="mean", metric="logit_diff")
    pt = FeaturePatcher(model, fg, ragged, ablation="mean", metric="logit_diff", prompt_batch=4)
    ours = fg.node_mask(["f0.3@0.mlp.post", "f0.40@0.mlp.post"])[None]
    torch.testing.assert_close(pt.run(ours), ref.run(graph.node_mask(["m0.n3", "m0.n40"])[None]), atol=1e-5, rtol=1e-5)
    fg3 = FeatureGraph.build(model, three_sites(), ragged, max_features_per_site=4)
    for method in ("patch", "atp", "ig"):
        a = feature_node_scores(model, fg3, ragged, method=method, ablation="resample", steps=2)
        b = feature_node_scores(model, fg3, ragged, method=method, ablation="resample", steps=2, prompt_batch=4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_bfloat16_model_with_a_float32_sae():
    m16 = native_bridge(normalization_type=None, act_fn="relu", seed=3).to(torch.bfloat16)
    b = random_batch(B=4, P=6, ragged=False, seed=1)
    fg = FeatureGraph.build(m16, three_sites(), b, max_features_per_site=4)
    pt = FeaturePatcher(m16, fg, b, ablation="resample")
    assert pt.clean_metric.dtype == torch.float32
    exact = feature_node_scores(m16, fg, b, method="patch", ablation="resample")
    atp = feature_node_scores(m16, fg, b, method="atp", ablation="resample")
    assert torch.isfinite(exact.values).all() and torch.isfinite(atp.values).all()
    assert float(torch.corrcoef(torch.stack([atp.values, exact.values]))[0, 1]) > 0.8


@pytest.mark.parametrize("which", ["native", "llama-gqa", "ioi-2l"])
def test_suffix_runs_equal_whole_forwards(which, zoo_model):
    """Masks re-run only the blocks from their first ablated site's (patching/replay.py); same numbers as whole
    forwards, sites at resid_pre / hook_z / mlp_out / resid_post of several layers."""
    from helpers_models import llama_bridge

    if which == "native":
        m, d, vocab = native_bridge(normalization_type="LN", act_fn="relu", n_layers=3, seed=5), D, 64
    elif which == "llama-gqa":
        m, d, vocab = llama_bridge(n_layers=3, n_heads=4, n_kv_heads=2, seed=5), D, 64
    else:
        m, d, vocab = zoo_model("ioi-2l"), 128, 600
    b = random_batch(vocab=vocab, B=3, P=7, ragged=True, seed=2)
    last = len(m.blocks) - 1
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", f"blocks.{last}.hook_mlp_out",
             f"blocks.{last}.hook_resid_post"]
    sites = {h: random_basis(h, d, 48, seed=i) for i, h in enumerate(hooks)}
    fg = FeatureGraph.build(m, sites, b, max_features_per_site=5)
    fast = FeaturePatcher(m, fg, b, ablation="mean")
    slow = FeaturePatcher(m, fg, b, ablation="mean", suffix=False)
    masks = torch.cat([torch.eye(fg.n_nodes, dtype=torch.bool)[:-1], fg.ablatable()[None],
                       torch.rand(5, fg.n_nodes) < 0.3])
    masks[:, -1] = False
    got = fast.run(masks)
    assert fast.engine.suffix_runs > 0 and slow.engine.suffix_runs == 0
    torch.testing.assert_close(got, slow.run(masks), atol=1e-5, rtol=1e-5)
