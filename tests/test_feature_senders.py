"""Sender families: each family's writes reproduce what the model computes at its hook (oracle: the model's own
hooks), the feature family's low-rank write equals the dense decode, and the head family equals the engine's
sender group."""

import torch
from helpers_features import random_basis
from helpers_models import native_bridge, random_batch

from patching.graph import ComponentGraph
from patching.senders import (
    FAMILIES,
    GROUP_FAMILIES,
    ErrorFamily,
    FeatureFamily,
    HeadFamily,
    MLPFamily,
    NeuronFamily,
    SpliceSite,
)
from patching.wiring import Wiring


def capture(model, tokens, hooks):
    seen = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, lambda x, hook, _h=h: seen.__setitem__(_h, x.clone()))
                                                 for h in hooks]):
        model(tokens)
    return seen


def test_head_and_neuron_families_rebuild_the_branch_outputs():
    m = native_bridge(normalization_type=None, act_fn="relu", seed=2)
    b = random_batch(B=3, P=5, ragged=False)
    seen = capture(m, b.clean, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post",
                                "blocks.1.hook_mlp_out"])
    heads = HeadFamily("blocks.1.attn.hook_z", m.W_O[1].detach())
    attn = heads.residual(heads.read(seen["blocks.1.attn.hook_z"])).sum(-2) + m.b_O[1]
    torch.testing.assert_close(attn, seen["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)
    neurons = NeuronFamily("blocks.1.mlp.hook_post", m.W_out[1].detach())
    mlp = neurons.residual(neurons.read(seen["blocks.1.mlp.hook_post"])).sum(-2) + m.b_out[1]
    torch.testing.assert_close(mlp, seen["blocks.1.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    whole = MLPFamily("blocks.1.hook_mlp_out")
    torch.testing.assert_close(whole.residual(seen["blocks.1.hook_mlp_out"])[..., 0, :], seen["blocks.1.hook_mlp_out"])
    # the engine's sender group of layer 1's heads writes the same
    w = Wiring(m, ComponentGraph.from_model(m))
    g = next(g for g in w.senders if g.kind == "heads" and g.layer == 1)
    z = seen["blocks.1.attn.hook_z"]
    torch.testing.assert_close(HeadFamily(g.hook, g.W_O).residual(z), g.out(g.units(z)))
    assert set(FAMILIES) == {"feature", "error", "neuron", "head", "mlp", "embed", "block"}
    # every engine sender group carries its family and delegates to it
    for grp in w.senders:
        assert isinstance(grp.family, GROUP_FAMILIES[grp.kind]) and grp.family.hook == grp.hook
    assert g.family.W_O is g.W_O


def test_feature_write_is_the_low_rank_decode_and_the_site_reads_both():
    basis = random_basis("blocks.0.hook_resid_post", 16, 40, seed=4)
    idx = torch.tensor([3, 7, 21])
    feats = FeatureFamily(basis.hook, basis, idx)
    site = SpliceSite(feats, ErrorFamily(basis.hook, basis))
    x = torch.randn(2, 5, 16)
    u, err = site.read(x)
    torch.testing.assert_close(u, basis.encode(x)[..., idx])
    torch.testing.assert_close(err, x - basis.decode(basis.encode(x)))
    coef = torch.randn(2, 5, 3)
    dense = torch.zeros(2, 5, 40)
    dense[..., idx] = coef
    torch.testing.assert_close(feats.write(coef), basis.decode(dense) - basis.b_dec, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(site.delta(coef, err), feats.write(coef) + err)
    # x = every feature's write + decoder bias + error
    full = FeatureFamily(basis.hook, basis, torch.arange(40))
    torch.testing.assert_close(full.write(full.read(x)) + basis.b_dec + site.error.read(x), x, atol=1e-6, rtol=1e-6)
