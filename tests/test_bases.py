"""Bases against oracles: the model's own MLP / attention outputs, numpy's eigendecomposition, hand-computed means."""

import numpy as np
import pytest
import torch

from explainers.bases import DirectionBasis, HeadBasis, NeuronBasis, load_basis, to_residual
from explainers.capture import capture
from patching.splice import splice

TOKS = torch.tensor([[0, 5, 9, 33, 70, 12, 40], [0, 8, 8, 101, 3, 64, 7]])


def _b(x):
    return 0 if x is None else x


@pytest.mark.parametrize("name", ["ioi-2l", "ioi-2l-gpt2"])
def test_neuron_basis_decodes_through_W_out_to_the_mlp_output(zoo_model, name):
    m = zoo_model(name)
    L = 1
    nb = NeuronBasis.from_model(m, L, model_name=name)
    acts = capture(m, [nb.hook, f"blocks.{L}.hook_mlp_out"], TOKS)
    post = acts[nb.hook]
    assert torch.equal(nb.encode(post), post) and torch.equal(nb.decode(nb.encode(post)), post)
    # oracle: the model's MLP output is sum_i neuron_i * write_direction_i + b_out
    W = nb.write_directions(m)
    assert torch.equal(W, m.blocks[L].mlp.W_out.detach())
    out = nb.encode(post) @ W + _b(m.blocks[L].mlp.b_out)
    torch.testing.assert_close(out, acts[f"blocks.{L}.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    assert str(nb.unit_id(17)) == f"{name}::m1.n17"
    assert nb.index_of("m1.n17") == 17
    with pytest.raises(ValueError, match="is not a unit of"):
        nb.index_of("m0.n17")


def test_head_basis_reads_each_heads_output_norm(zoo_model):
    m = zoo_model("ioi-2l")
    L = 1
    hb = HeadBasis.from_model(m, L, model_name="ioi-2l")
    acts = capture(m, [hb.hook, f"blocks.{L}.hook_attn_out"], TOKS)
    z = acts[hb.hook]                                     # [B, P, H, d_head]
    per_head = torch.stack([z[:, :, h] @ m.blocks[L].attn.W_O[h] for h in range(hb.n_units)], 2)
    # the per-head outputs add up to the attention output (so the norms are of the right vectors)
    torch.testing.assert_close(per_head.sum(2) + _b(m.blocks[L].attn.b_O), acts[f"blocks.{L}.hook_attn_out"],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hb.encode(z), per_head.norm(dim=-1))
    torch.testing.assert_close(hb.encode(z.flatten(-2)), per_head.norm(dim=-1))
    assert [str(u) for u in hb.unit_ids()][:2] == ["ioi-2l::a1.h0", "ioi-2l::a1.h1"]
    with pytest.raises(ValueError, match="cannot decode"):
        with splice(m, {hb.hook: hb}):
            pass
    # write direction: the top right-singular vector of W_O[h] (unit norm; |W_O[h] v| is the top singular value)
    v = hb.write_directions()
    for h in range(hb.n_units):
        s = torch.linalg.svdvals(m.blocks[L].attn.W_O[h].detach().double())[0]
        assert abs(float(v[h].norm()) - 1) < 1e-5
        assert abs(float((m.blocks[L].attn.W_O[h].detach().double() @ v[h].double()).norm()) - float(s)) < 1e-4


def test_pca_directions_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    b = DirectionBasis.pca(x, 3, "blocks.0.hook_resid_post", model="toy", name="pca3")
    xd = x.double().numpy()
    cov = np.cov(xd, rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    for i in range(3):
        ref = v[:, order[i]]
        assert abs(abs(float(b.directions[i].double() @ torch.from_numpy(ref))) - 1) < 1e-5
    np.testing.assert_allclose(b.stats["explained_variance_ratio"], (w[order] / w.sum())[:3], rtol=1e-5)
    # decode(encode(x)) = projection on the top-3 subspace around the mean; the error is orthogonal to it
    x_hat = b.decode(b.encode(x))
    err = x - x_hat
    assert float((err @ b.directions.T).abs().max()) < 1e-4
    np.testing.assert_allclose(b.center.numpy(), xd.mean(0), rtol=1e-5)
    assert str(b.unit_id(2)) == "toy:pca3:d0.2@0.resid_post"


def test_difference_of_means_plain_and_mean_centred():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(40, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, 0])
    neg = torch.randn(30, 5, generator=g) - torch.tensor([0, 1.0, 0, 0, 0])
    bg = torch.randn(100, 5, generator=g) + 0.5
    plain = DirectionBasis.diff_means(pos, neg, "blocks.1.hook_resid_pre", label="pos-neg")
    torch.testing.assert_close(plain.directions[0], (pos.mean(0) - neg.mean(0)).float())
    torch.testing.assert_close(plain.encode(pos.mean(0)), torch.tensor([0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.encode(neg.mean(0)), torch.tensor([-0.5]), atol=1e-5, rtol=0)
    mc = DirectionBasis.mean_centred({"pos": pos, "neg": neg}, bg, "blocks.1.hook_resid_pre")
    torch.testing.assert_close(mc.directions[0], (pos.mean(0) - bg.mean(0)).float())
    torch.testing.assert_close(mc.directions[1], (neg.mean(0) - bg.mean(0)).float())
    torch.testing.assert_close(mc.encode(pos.mean(0)), torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(mc.encode(bg.mean(0)), torch.tensor([0.0, 0.0]), atol=1e-5, rtol=0)
    assert mc.labels == ("pos", "neg")
    with pytest.raises(ValueError, match="same mean"):
        DirectionBasis.diff_means(pos, pos, "blocks.1.hook_resid_pre")


def test_bases_save_and_load_round_trip(zoo_model, tmp_path):
    m = zoo_model("ioi-2l")
    x = torch.randn(50, 128)
    bases = [NeuronBasis.from_model(m, 0, model_name="ioi-2l", name="n"), HeadBasis.from_model(m, 1, name="h"),
             DirectionBasis.pca(x, 4, "blocks.1.hook_resid_pre", model="ioi-2l", name="pca")]
    for i, b in enumerate(bases):
        d = b.save(tmp_path / str(i))
        back = load_basis(d)
        assert type(back) is type(b) and back.config() == b.config()
        assert back.unit_ids() == b.unit_ids()
        for k, v in b.tensors().items():
            assert torch.equal(back.tensors()[k], v)


def test_to_residual_known_and_unknown_hooks(zoo_model):
    m = zoo_model("ioi-2l")
    v = torch.randn(3, 128)
    assert torch.equal(to_residual(m, "blocks.0.hook_resid_post", v), v)
    z = torch.randn(3, 4 * 32)
    expect = torch.einsum("nhd,hdm->nm", z.reshape(3, 4, 32), m.blocks[0].attn.W_O.detach())
    torch.testing.assert_close(to_residual(m, "blocks.0.attn.hook_z", z), expect)
    with pytest.raises(ValueError, match="no known map"):
        to_residual(m, "blocks.0.attn.hook_pattern", v)
