"""SAEs: identity oracles, TopK's L0, hand-computed metrics, error_linear_r2 oracles, STE gradients, save/load,
deterministic and resumable training, recovery of a planted dictionary."""

import math

import pytest
import torch

from evals.sae_metrics import error_linear_r2, reconstruction_metrics, spliced_losses
from explainers.bases import FeatureBasis
from explainers.sae import SAE, SAEConfig, TensorSource, TrainConfig, load_sae, save_sae, train_sae
from explainers.sae.archs.jumprelu import JumpReLUFn, StepFn
from explainers.sae.train import geometric_median

HOOK = "blocks.1.hook_resid_pre"


def identity_sae(d, arch="relu-l1"):
    """2d latents [x, -x]: ReLU(x) - ReLU(-x) = x, exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, arch=arch, centring="none", k=d if arch == "topk" else None, hook=HOOK,
                        apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.requires_grad_(False)


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "jumprelu", "batchtopk"])
def test_identity_sae_has_ev_one_and_mse_zero(arch):
    x = torch.randn(300, 16) + 2
    m = reconstruction_metrics(identity_sae(16, arch), x.split(100))
    assert m["mse"] == 0.0 and m["explained_variance"] == 1.0
    assert m["l0"] == 16.0 and m["dead_fraction"] == 0.0


def test_topk_keeps_exactly_k_positive_latents():
    g = torch.Generator().manual_seed(0)
    k = 7
    sae = SAE(SAEConfig(d_in=12, d_sae=64, arch="topk", centring="learned", k=k))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(500, 12, generator=g)
    pre = sae.pre_acts(x)
    f = sae.encode(x)
    l0 = (f != 0).sum(-1)
    n_pos = (pre > 0).sum(-1)
    assert torch.equal(l0, torch.clamp(n_pos, max=k))          # = k wherever k pre-activations are positive
    assert (n_pos >= k).float().mean() > 0.9 and (l0 == k).float().mean() > 0.9
    kept = f != 0                                               # and they are the largest ones
    assert bool((pre[kept].reshape(-1).min() if kept.sum() else 0) >= 0)
    top = torch.topk(pre, k, -1).values[:, -1:]
    assert bool(((pre >= top) | ~kept).all())
    with pytest.raises(ValueError, match="1 <= k <= d_sae"):
        SAEConfig(d_in=4, d_sae=8, arch="topk", centring="none", k=9)


def test_reconstruction_metrics_against_hand_computed_values():
    sae = SAE(SAEConfig(d_in=2, d_sae=3, arch="relu-l1", centring="learned"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[0.5, 0], [0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[3.0, 2.0], [1.0, -1.0], [0.0, 4.0], [2.0, 2.0]])
    # by hand: x - b_dec = [2,2],[0,-1],[-1,4],[1,2]; f = relu = [2,2,0],[0,0,0],[0,4,0],[1,2,0]
    # x_hat = f W_dec + b_dec = [2,2],[1,0],[1,4],[1.5,2]; e = [1,0],[0,-1],[-1,0],[0.5,0]
    m = reconstruction_metrics(sae, [x])
    see = 1 + 1 + 1 + 0.25
    mean = torch.tensor([1.5, 1.75])
    var = float(((x - mean) ** 2).sum())                        # 5 + 14.75 = 19.75
    assert m["mse"] == pytest.approx(see / 8)
    assert m["explained_variance"] == pytest.approx(1 - see / var)
    assert m["l0"] == pytest.approx((2 + 0 + 1 + 2) / 4)
    assert m["dead_fraction"] == pytest.approx(1 / 3)
    assert m["density"] == pytest.approx([2 / 4, 3 / 4, 0.0])
    me = torch.tensor([0.5 / 4, -1 / 4])
    assert m["mean_error_data_cos"] == pytest.approx(float(me @ mean / (me.norm() * mean.norm())))


def test_error_linear_r2_oracles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 24, generator=g) * torch.linspace(0.5, 3, 24) + 1.0
    A = torch.randn(24, 24, generator=g)
    b = torch.randn(24, generator=g)
    fit, test = slice(0, 4000), slice(4000, None)
    e_lin = x @ A + b
    assert error_linear_r2(x[fit], e_lin[fit], x[test], e_lin[test]) == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(6000, 24, generator=g)
    r2 = error_linear_r2(x[fit], noise[fit], x[test], noise[test])
    assert abs(r2) < 0.02                                        # expected -(d+1)/N_fit ~ -0.006
    half = 0.5 * e_lin / e_lin.std() + noise                     # half and half: a known share
    r2h = error_linear_r2(x[fit], half[fit], x[test], half[test])
    lin_var = float((0.5 * e_lin[test] / e_lin.std()).var(0).sum())
    assert r2h == pytest.approx(lin_var / (lin_var + float(noise[test].var(0).sum())), abs=0.02)


def test_jumprelu_straight_through_gradients_match_the_paper():
    pre = torch.tensor([[0.30, 0.52, 0.49], [0.10, 0.75, 0.51]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.05
    f = JumpReLUFn.apply(pre, theta, eps)
    assert torch.equal(f.detach(), torch.tensor([[0.0, 0.52, 0.0], [0.0, 0.75, 0.51]]))
    f.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    # d/dtheta = -(theta/eps) K((pre - theta)/eps), K = 1 on |u| < 1/2: pre within 0.025 of theta
    inside = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(theta.grad, -(0.5 / eps) * inside.sum(0))
    theta.grad = None
    StepFn.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, -(1 / eps) * inside.sum(0))


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, 3, generator=g), torch.randn(20, 3, generator=g) * 30 + 50])
    m = geometric_median(x).double()
    cost = lambda c: float((x.double() - c).norm(dim=1).sum())  # noqa: E731
    for d in torch.eye(3, dtype=torch.float64):
        assert cost(m) <= cost(m + 1e-3 * d) and cost(m) <= cost(m - 1e-3 * d)
    assert float(m.norm()) < float(x.mean(0).norm())            # robust to the outlying cluster


def planted_data(n=20000, d=24, m=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, m, generator=g) < 3 / m).float() * (torch.rand(n, m, generator=g) + 0.5)
    return codes @ D + 0.01 * torch.randn(n, d, generator=g) + 1.5, D


SPARSITY = {"relu-l1": dict(l1_coefficient=1.0), "topk": dict(k=3), "batchtopk": dict(k=3),
            "jumprelu": dict(l0_coefficient=0.05)}


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk", "jumprelu"])
def test_training_recovers_a_planted_dictionary(arch, tmp_path):
    x, D = planted_data()
    cfg = TrainConfig(arch=arch, centring="learned", width=48, train_tokens=256 * 500, batch_size=256, lr=3e-3,
                      **SPARSITY[arch])
    sae = train_sae(TensorSource(x), cfg, tmp_path, progress=False)
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    mmcs = float((D @ W.T).max(1).values.mean())               # mean max cosine, planted vs learned
    assert mmcs > 0.9, mmcs


@pytest.mark.parametrize("arch,centring", [("topk", "learned"), ("jumprelu", "mean"), ("batchtopk", "none"),
                                           ("relu-l1", "mean")])
def test_training_is_deterministic_and_resumes_bit_identically(arch, centring, tmp_path):
    x, _ = planted_data(n=3000)
    cfg = TrainConfig(arch=arch, centring=centring, width=32, train_tokens=128 * 60, batch_size=128, lr=3e-3,
                      dead_tokens=500, **SPARSITY[arch])
    a = train_sae(TensorSource(x), cfg, tmp_path / "a", progress=False)
    assert train_sae(TensorSource(x), cfg, tmp_path / "b", progress=False, max_steps=17) is None
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    assert train_sae(TensorSource(x), cfg, tmp_path / "b", progress=False, max_steps=20) is None
    b = train_sae(TensorSource(x), cfg, tmp_path / "b", progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for f in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="width differs"):
        train_sae(TensorSource(x), TrainConfig(**{**cfg.to_dict(), "width": 16}), tmp_path / "a", progress=False)


def test_centring_semantics_after_training(tmp_path):
    x, _ = planted_data(n=4000)
    kw = dict(arch="topk", k=3, width=32, train_tokens=128 * 30, batch_size=128, lr=3e-3)
    mean = train_sae(TensorSource(x), TrainConfig(centring="mean", **kw), tmp_path / "m", progress=False)
    torch.testing.assert_close(mean.b_dec, x.double().mean(0).float(), atol=1e-5, rtol=1e-5)  # fixed data mean
    assert mean.cfg.apply_b_dec_to_input
    none = train_sae(TensorSource(x), TrainConfig(centring="none", **kw), tmp_path / "n", progress=False)
    assert not none.cfg.apply_b_dec_to_input and torch.equal(none.b_dec, torch.zeros(24))
    learned = train_sae(TensorSource(x), TrainConfig(centring="learned", **kw), tmp_path / "l", progress=False)
    assert learned.cfg.apply_b_dec_to_input and float((learned.b_dec - x.mean(0)).norm()) > 1e-3


def test_fold_scale_keeps_the_encoding():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, arch="jumprelu", centring="learned"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape))
        sae.threshold.copy_(torch.rand(16))
    x = torch.randn(50, 8)
    s = 3.7
    f_scaled = sae.encode(x * s)
    xh_scaled = sae.decode(f_scaled)
    sae.fold_scale(s)
    torch.testing.assert_close(sae.encode(x), f_scaled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f_scaled), xh_scaled / s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("centring", ["none", "learned", "mean"])
def test_save_load_round_trip_is_bit_identical(arch, centring, tmp_path):
    cfg = SAEConfig(d_in=8, d_sae=16, arch=arch, centring=centring, k=4 if arch == "topk" else None, hook=HOOK,
                    model="ioi-2l", apply_b_dec_to_input=centring != "none")
    sae = SAE(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if not (name == "b_dec" and centring == "none"):
                p.copy_(torch.randn(p.shape).abs() if name == "threshold" else torch.randn(p.shape))
    save_sae(sae, tmp_path / "a")
    back = load_sae(tmp_path / "a")
    assert back.cfg == cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    save_sae(back, tmp_path / "b")
    for f in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    x = torch.randn(20, 8)
    assert torch.equal(sae.encode(x), back.encode(x))


def test_load_refuses_what_it_cannot_reproduce(tmp_path):
    import json

    sae = SAE(SAEConfig(d_in=4, d_sae=8, arch="relu-l1", centring="learned", hook=HOOK))
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "circuitexplain"} |
                                                  {"architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path)


def test_ce_recovered_and_kl_ratio_oracles(zoo_model):
    m = zoo_model("ioi-2l")
    toks = torch.tensor([[0, 5, 9, 33, 70, 12, 40, 7], [0, 8, 8, 101, 3, 64, 7, 2]])
    real = torch.ones_like(toks, dtype=torch.bool)
    real[1, 6:] = False
    ident = FeatureBasis(identity_sae(128))
    out = spliced_losses(m, ident, [(toks, real)])
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-5)    # a perfect SAE recovers everything
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and out["kl_sae"] < 1e-8
    zero = identity_sae(128)
    with torch.no_grad():
        zero.W_dec.zero_()
    out0 = spliced_losses(m, FeatureBasis(zero), [(toks, real)])
    assert out0["ce_sae"] == pytest.approx(out0["ce_zero"], abs=1e-5)   # a zero reconstruction recovers nothing
    assert out0["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert out0["ce_zero"] > out0["ce_clean"]
    # by hand: next-token cross-entropy of the clean model over real positions
    with torch.no_grad():
        lp = torch.log_softmax(m(toks).float(), -1)
    nll = [-float(lp[b, t, toks[b, t + 1]]) for b in range(2) for t in range(7) if real[b, t + 1]]
    assert out["ce_clean"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert out["n_ce_positions"] == len(nll) and out["n_kl_positions"] == int(real[:, 1:].sum())
    assert math.isfinite(out0["error_kl_ratio"])


def test_ctrl_c_checkpoints_a_completed_step_and_resumes_identically(tmp_path):
    import os
    import signal
    import threading

    x, _ = planted_data(n=3000)
    cfg = TrainConfig(arch="topk", centring="learned", width=32, k=3, train_tokens=64 * 1500, batch_size=64,
                      lr=3e-3)
    ref = train_sae(TensorSource(x), cfg, tmp_path / "ref", progress=False, max_steps=None)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sae(TensorSource(x), cfg, tmp_path / "cut", progress=False)
    finally:
        timer.cancel()
    step = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < cfg.n_steps
    again = train_sae(TensorSource(x), cfg, tmp_path / "cut", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
