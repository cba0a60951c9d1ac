"""SAE quality metrics on held-out tokens (formulas in docs/saes.md), written to ``DIR/metrics.json``.

With ``x`` the activations, ``x_hat`` the reconstruction and ``e = x - x_hat`` (sums in float64):

- ``mse`` = mean over tokens and dimensions of ``e^2``; ``explained_variance`` = ``1 - sum ||e||^2 /
  sum ||x - mean(x)||^2``; ``l0`` = mean number of non-zero latents per token; ``dead_fraction`` = share of
  latents that never fire on the held-out tokens; ``density`` = each latent's firing frequency (histogram PNG);
- ``mean_error_data_cos`` = cosine between ``mean(e)`` and ``mean(x)``: a centring error shows as a mean error
  along the data mean;
- ``error_linear_r2`` (Engels et al. 2024, *Decomposing the dark matter of sparse autoencoders*): fit
  ``e ~ x W + b`` by least squares on training rows, then on held-out rows ``1 - sum ||e - e_pred||^2 /
  sum ||e - mean(e)||^2``: the share of the error's variance a linear map of the input predicts;
- ``ce_loss_recovered`` = ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``: next-token cross-entropy on held-out
  contexts with the hook's activations replaced by the reconstruction (error dropped) or by zeros, at the
  positions the store keeps (BOS and padding untouched);
- ``error_kl_ratio`` (Gurnee 2024): ``KL(clean || SAE spliced) / KL(clean || x + eps)``, ``eps`` random with the
  norm of ``e`` at each position (:func:`patching.splice.splice` ``error="random"``), mean over those positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from explainers.bases import FeatureBasis
from patching.splice import splice

METRICS_JSON = "metrics.json"
DENSITY_PNG = "density.png"


@torch.no_grad()
def reconstruction_metrics(sae: Any, batches: Iterable[Tensor]) -> dict[str, Any]:
    """``mse, explained_variance, l0, dead_fraction, mean_error_data_cos, n_tokens`` and ``density`` (a list)."""
    n = 0
    sx = se = None
    sxx = see = l0 = 0.0
    fired = None
    dev = sae.W_enc.device
    for x in batches:
        x = x.to(dev, torch.float32)
        x_hat, f = sae(x)
        e = (x - x_hat).double().cpu()
        xd = x.double().cpu()
        if sx is None:
            sx = torch.zeros(x.shape[1], dtype=torch.float64)
            se = torch.zeros_like(sx)
            fired = torch.zeros(f.shape[1], dtype=torch.float64)
        sx += xd.sum(0)
        se += e.sum(0)
        sxx += float((xd ** 2).sum())
        see += float((e ** 2).sum())
        nz = (f != 0).cpu()
        l0 += float(nz.sum())
        fired += nz.sum(0).double()
        n += x.shape[0]
    if n == 0:
        raise ValueError("reconstruction_metrics: no activations given")
    d = sx.shape[0]
    mean = sx / n
    total_var = sxx - n * float(mean @ mean)
    me = se / n
    cos = float(me @ mean / (me.norm() * mean.norm()).clamp_min(1e-30))
    density = fired / n
    return {"mse": see / (n * d), "explained_variance": 1.0 - see / total_var if total_var > 0 else float("nan"),
            "l0": l0 / n, "dead_fraction": float((fired == 0).double().mean()), "mean_error_data_cos": cos,
            "n_tokens": n, "density": density.tolist()}


def error_linear_r2(x_fit: Float[Tensor, "N d"], e_fit: Float[Tensor, "N d"], x_test: Float[Tensor, "M d"],
                    e_test: Float[Tensor, "M d"], ridge: float = 1e-8) -> float:
    """Held-out R^2 of the least-squares affine prediction of the error from the input (module docstring).

    Solved in float64 through the normal equations, with a ridge of ``ridge * trace(A^T A) / (d + 1)`` for
    numerical safety (it changes nothing measurable when the fit rows outnumber the dimensions).
    """
    if x_fit.shape[0] <= x_fit.shape[1]:
        raise ValueError(f"error_linear_r2: {x_fit.shape[0]} fit rows for {x_fit.shape[1]} dimensions; need more "
                         "rows than dimensions")
    A = torch.cat([x_fit.double(), torch.ones(x_fit.shape[0], 1, dtype=torch.float64)], 1)
    G = A.T @ A
    G += ridge * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=torch.float64)
    beta = torch.linalg.solve(G, A.T @ e_fit.double())
    B = torch.cat([x_test.double(), torch.ones(x_test.shape[0], 1, dtype=torch.float64)], 1)
    et = e_test.double()
    resid = float(((et - B @ beta) ** 2).sum())
    total = float(((et - et.mean(0)) ** 2).sum())
    return 1.0 - resid / total if total > 0 else float("nan")


def _token_batches(store: Any, shards: list[int], pad: int, max_contexts: int, batch_size: int):
    n = 0
    for s in shards:
        toks, _ = store.contexts(s)
        for i in range(0, toks.shape[0], batch_size):
            if n >= max_contexts:
                return
            t = toks[i:i + min(batch_size, max_contexts - n)].long()
            real = t >= 0
            yield torch.where(real, t, torch.full_like(t, pad)), real
            n += t.shape[0]


def _ce_sum(logits: Tensor, tokens: Tensor, real: Tensor) -> tuple[float, int]:
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = tokens[:, 1:]
    ok = real[:, 1:] & real[:, :-1]
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return float(nll[ok].double().sum()), int(ok.sum())


def _kl_sum(clean: Tensor, other: Tensor, where: Tensor) -> float:
    p = torch.log_softmax(clean.float(), -1)
    q = torch.log_softmax(other.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl[where].double().sum())


@torch.no_grad()
def spliced_losses(model: Any, basis: Any, batches: Iterable[tuple[Int[Tensor, "B P"], Bool[Tensor, "B P"]]], *,
                   first_position: int = 1, seed: int = 0) -> dict[str, float]:
    """CE (clean / SAE spliced without error / hook zeroed) and KL (SAE spliced / random error of the same norm)
    over token batches; ``first_position`` = first position spliced (1: BOS left alone)."""
    hook = basis.hook
    dev = next(model.parameters()).device
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "random": 0.0}
    n_ce = n_kl = 0
    for k, (tokens, real) in enumerate(batches):
        tokens, real = tokens.to(dev), real.to(dev)
        mask = real.clone()
        mask[:, :first_position] = False
        clean = model(tokens)
        with splice(model, {hook: basis}, error="drop", mask=mask, record=False):
            sae_logits = model(tokens)
        with splice(model, {hook: basis}, error="random", mask=mask, seed=seed + k, record=False):
            rnd_logits = model(tokens)

        def zero(x: Tensor, hook: Any, m: Tensor = mask) -> Tensor:
            return torch.where(m.reshape(*m.shape, *([1] * (x.dim() - 2))), torch.zeros_like(x), x)

        with model.hooks(fwd_hooks=[(hook, zero)]):
            zero_logits = model(tokens)
        for name, lg in (("clean", clean), ("sae", sae_logits), ("zero", zero_logits)):
            s, c = _ce_sum(lg, tokens, real)
            ce[name] += s
        n_ce += c
        kl["sae"] += _kl_sum(clean, sae_logits, mask)
        kl["random"] += _kl_sum(clean, rnd_logits, mask)
        n_kl += int(mask.sum())
    if n_ce == 0 or n_kl == 0:
        raise ValueError("spliced_losses: no predicted positions in the given contexts")
    out = {f"ce_{k}": v / n_ce for k, v in ce.items()}
    out.update({f"kl_{k}": v / n_kl for k, v in kl.items()})
    out.update(loss_ratios(out))
    out["n_ce_positions"], out["n_kl_positions"] = n_ce, n_kl
    return out


def loss_ratios(losses: dict[str, float]) -> dict[str, float]:
    """The one definition of ``ce_loss_recovered`` = (CE zero - CE SAE) / (CE zero - CE clean) and
    ``error_kl_ratio`` = KL(SAE) / KL(random error of the same norm); NaN where the denominator is 0."""
    den = losses["ce_zero"] - losses["ce_clean"]
    return {"ce_loss_recovered": (losses["ce_zero"] - losses["ce_sae"]) / den if den != 0 else float("nan"),
            "error_kl_ratio": losses["kl_sae"] / losses["kl_random"] if losses["kl_random"] > 0 else float("nan")}


@torch.no_grad()
def heldout_error_r2(sae: Any, store: Any, hook: str, train: Any, eval_x: Tensor, *, n_fit_rows: int,
                     seed: int) -> tuple[float, int]:
    """``error_linear_r2`` of ``sae``: the linear map fitted on up to ``n_fit_rows`` training rows, scored on
    ``eval_x``; returns it and the number of fitting rows."""
    fit_x = next(store.batches(hook, min(n_fit_rows, store.n_rows_in(train)), seed=seed, shards=train,
                               buffer_shards=16))
    dev = sae.W_enc.device
    e_fit = fit_x - sae(fit_x.to(dev))[0].cpu()
    e_eval = torch.cat([x - sae(x.to(dev))[0].cpu() for x in eval_x.split(4096)])
    return error_linear_r2(fit_x, e_fit, eval_x, e_eval), int(fit_x.shape[0])


def write_metrics(metrics: dict[str, Any], density: list[float], out_dir: str | os.PathLike | None, *,
                  sae: Any, hook: str) -> dict[str, Any]:
    """``metrics`` with its ``density`` (written atomically to ``out_dir/metrics.json`` with ``density.png``
    when ``out_dir`` is given)."""
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (METRICS_JSON + ".tmp")
        tmp.write_text(json.dumps({**metrics, "density": density}, indent=1) + "\n")
        os.replace(tmp, out / METRICS_JSON)
        density_histogram(density, out / DENSITY_PNG, title=f"{sae.cfg.arch}/{sae.cfg.centring} at {hook}")
    metrics["density"] = density
    return metrics


def density_histogram(density: list[float], path: str | os.PathLike, *, title: str = "") -> Path:
    """Histogram of log10 firing frequency; never-firing latents counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dens = np.asarray(density, dtype=np.float64)
    live = dens[dens > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if live.size:
        ax.hist(np.log10(live), bins=50, color="#4477aa")
    ax.set_xlabel("log10 firing frequency (held-out tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}  ({int((dens == 0).sum())} of {dens.size} never fire)".strip(), fontsize=9)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def evaluate_sae(model: Any, sae: Any, store: Any, hook: str, *, holdout: float = 0.1, n_fit_rows: int = 20000,
                 n_eval_rows: int | None = None, ce_contexts: int = 64, batch_size: int = 16, seed: int = 0,
                 out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """All metrics of module docstring for ``sae`` at ``hook``, on the store's held-out shards.

    With ``out_dir``, writes ``metrics.json`` (atomically) and ``density.png`` there.
    """
    train, held = store.split(holdout)
    basis = FeatureBasis(sae, hook=hook)
    eval_x = store.read(hook, held)
    if n_eval_rows is not None:
        eval_x = eval_x[:n_eval_rows]
    rec = reconstruction_metrics(sae, eval_x.split(4096))
    r2, n_fit = heldout_error_r2(sae, store, hook, train, eval_x, n_fit_rows=n_fit_rows, seed=seed)
    cfg = store.config
    first = 1 if (cfg.prepend_bos and cfg.exclude_bos) else 0
    pad = store.manifest["settings"]["tokenizer"]["pad"]
    pad = 0 if pad is None else int(pad)
    losses = spliced_losses(model, basis, _token_batches(store, held, pad, ce_contexts, batch_size),
                            first_position=first, seed=seed)
    density = rec.pop("density")
    metrics = {**rec, "error_linear_r2": r2, **losses, "n_fit_tokens": n_fit,
               "store": str(store.path), "hook": hook, "heldout_shards": held, "fit_shards": train,
               "holdout": holdout, "seed": seed, "ce_contexts": ce_contexts,
               "sae": {"arch": sae.cfg.arch, "centring": sae.cfg.centring, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}}
    return write_metrics(metrics, density, out_dir, sae=sae, hook=hook)
