"""Splicing bases into a model: exact with the error term, hand-written hooks as oracles for the other modes."""

import pytest
import torch

from explainers.bases import DirectionBasis, FeatureBasis, NeuronBasis
from explainers.capture import capture
from explainers.sae.model import SAE, SAEConfig
from patching.splice import splice

TOKS = torch.tensor([[0, 5, 9, 33, 70, 12, 40, 7], [0, 8, 8, 101, 3, 64, 7, 2]])
HOOK = "blocks.1.hook_resid_pre"


def random_sae(d=128, n=512, arch="topk", centring="learned", seed=0, k=8):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=n, arch=arch, centring=centring, k=k if arch == "topk" else None, hook=HOOK,
                        apply_b_dec_to_input=centring != "none"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.W_enc.copy_(sae.W_dec.T * 3)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        if centring != "none":
            sae.b_dec.copy_(torch.randn(d, generator=g))
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(torch.rand(n, generator=g) * 0.5)
    return sae.eval().requires_grad_(False)


def no_hooks_left(m):
    return all(len(hp._forward_hooks) == 0 for hp in m.hook_dict.values())


@pytest.mark.parametrize("arch", ["topk", "relu-l1", "jumprelu"])
def test_spliced_sae_with_error_leaves_logits_unchanged(zoo_model, arch):
    m = zoo_model("ioi-2l")
    basis = FeatureBasis(random_sae(arch=arch), name="rand")
    clean = m(TOKS)
    with splice(m, {HOOK: basis}) as rec:
        spliced = m(TOKS)
    assert (spliced - clean).abs().max() < 1e-5
    assert no_hooks_left(m)
    x = capture(m, [HOOK], TOKS)[HOOK]
    units = basis.encode(x)
    torch.testing.assert_close(rec.units[HOOK], units)
    torch.testing.assert_close(rec.errors[HOOK], x - basis.decode(units))
    assert float(rec.errors[HOOK].detach().abs().max()) > 0.1   # a real error term, not a trivial SAE


def test_drop_error_equals_a_hand_written_substitution(zoo_model):
    m = zoo_model("ioi-2l")
    sae = random_sae()
    mask = torch.ones(TOKS.shape, dtype=torch.bool)
    mask[:, 0] = False

    def oracle(x, hook):
        return torch.where(mask[..., None], sae(x)[0], x)

    with m.hooks(fwd_hooks=[(HOOK, oracle)]):
        expect = m(TOKS)
    with splice(m, {HOOK: FeatureBasis(sae)}, error="drop", mask=mask):
        got = m(TOKS)
    torch.testing.assert_close(got, expect)
    assert (got - m(TOKS)).abs().max() > 1e-2


def test_random_error_has_the_error_norm_and_is_seeded(zoo_model):
    m = zoo_model("ioi-2l")
    basis = FeatureBasis(random_sae())
    seen = {}

    def after(x, hook):
        seen.setdefault("x", []).append(x.detach().clone())

    x = capture(m, [HOOK], TOKS)[HOOK]
    err = x - basis.decode(basis.encode(x))
    # the splice's hook runs first, a later hook on the same point sees its output
    with splice(m, {HOOK: basis}, error="random", seed=3), m.hooks(fwd_hooks=[(HOOK, after)]):
        m(TOKS)
        m(TOKS)
    eps0, eps1 = seen["x"][0] - x, seen["x"][1] - x
    torch.testing.assert_close(eps0.norm(dim=-1), err.norm(dim=-1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eps0, eps1)                   # fresh noise per forward
    seen.clear()
    with splice(m, {HOOK: basis}, error="random", seed=3), m.hooks(fwd_hooks=[(HOOK, after)]):
        m(TOKS)
    assert torch.equal(seen["x"][0] - x, eps0)               # same seed, same noise
    cos = torch.nn.functional.cosine_similarity(eps0.flatten(0, 1), err.flatten(0, 1), dim=-1)
    assert float(cos.abs().mean()) < 0.3                     # a random direction, not the error's


def test_edit_all_features_zero_leaves_error_plus_decoder_bias(zoo_model):
    m = zoo_model("ioi-2l")
    sae = random_sae()
    basis = FeatureBasis(sae)
    seen = {}

    def after(x, hook):
        seen["x"] = x.detach().clone()

    x = capture(m, [HOOK], TOKS)[HOOK]
    err = x - sae(x)[0]
    with splice(m, {HOOK: basis}, edit={HOOK: torch.zeros_like}), m.hooks(fwd_hooks=[(HOOK, after)]):
        m(TOKS)
    torch.testing.assert_close(seen["x"], err + sae.b_dec, atol=1e-5, rtol=1e-5)


def test_neuron_and_direction_bases_splice_exactly(zoo_model):
    m = zoo_model("ioi-2l")
    clean = m(TOKS)
    nb = NeuronBasis.from_model(m, 1)
    acts = capture(m, [HOOK], TOKS)[HOOK].flatten(0, 1)
    db = DirectionBasis.pca(acts, 4, HOOK)
    with splice(m, {nb.hook: nb, HOOK: db}) as rec:
        out = m(TOKS)
    assert (out - clean).abs().max() < 1e-5
    assert float(rec.errors[nb.hook].detach().abs().max()) == 0.0   # neurons reconstruct their hook exactly
    assert rec.units[HOOK].shape == (2, 8, 4)


def test_hook_z_basis_sees_flattened_heads(zoo_model):
    m = zoo_model("ioi-2l")
    sae = random_sae(d=128, n=256)
    hook = "blocks.0.attn.hook_z"
    clean = m(TOKS)
    with splice(m, {hook: FeatureBasis(sae, hook=hook)}) as rec:
        out = m(TOKS)
    assert (out - clean).abs().max() < 1e-5
    assert rec.units[hook].shape == (2, 8, 256)


def test_splice_restores_the_model_after_an_exception_and_checks_input(zoo_model):
    m = zoo_model("ioi-2l")
    basis = FeatureBasis(random_sae())
    with pytest.raises(RuntimeError, match="boom"):
        with splice(m, {HOOK: basis}):
            raise RuntimeError("boom")
    assert no_hooks_left(m)
    with pytest.raises(ValueError, match="no hook 'blocks.9.hook_resid_pre'"):
        with splice(m, {"blocks.9.hook_resid_pre": basis}):
            pass
    with pytest.raises(ValueError, match="reads 'blocks.1.hook_resid_pre' but was given for hook"):
        with splice(m, {"blocks.0.hook_resid_pre": basis}):
            pass
    with pytest.raises(ValueError, match="last dimension of 64"):
        with splice(m, {HOOK: FeatureBasis(random_sae(d=64))}):
            m(TOKS)
    assert no_hooks_left(m)
    with pytest.raises(ValueError, match="error mode 'nope'"):
        with splice(m, {HOOK: basis}, error="nope"):
            pass
