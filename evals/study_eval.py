"""SAE metrics for the studies on a large model, with the LM passes cut to what each SAE needs.

Same quantities and formulas as :func:`evals.sae_metrics.evaluate_sae` (docs/saes.md), measured on the same
held-out shards and contexts, with two savings that matter for ``smollm2-135m`` on a CPU:

- each held-out context runs alone, cut to its own length (a store's context tensor is padded to the longest
  context of its shard: for fortunes about 3x the real tokens); right padding never changes a causal model's
  outputs at real positions, so CE and KL are the same numbers;
- the clean pass (logits, CE) and the zero-ablation CE do not depend on the SAE: computed once per (store, hook,
  contexts) and kept in ``cache``; each SAE then costs two passes (SAE spliced without error; random error of
  the same norm), instead of four.

The random-error control draws its directions per context (``seed + context number``) instead of per batch of 16,
so ``kl_random`` is a different draw of the same distribution as in ``evaluate_sae``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from evals.sae_metrics import heldout_error_r2, loss_ratios, reconstruction_metrics, write_metrics
from explainers.bases import FeatureBasis
from patching.splice import splice


def _contexts(store: Any, shards: list[int], max_contexts: int) -> list[Tensor]:
    out: list[Tensor] = []
    for s in shards:
        toks, _ = store.contexts(s)
        for t in toks:
            if len(out) >= max_contexts:
                return out
            real = t >= 0
            out.append(t[: int(real.nonzero().max()) + 1].long().unsqueeze(0))
    return out


def _ce(logits: Tensor, tokens: Tensor) -> float:
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return float(-lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).double().sum())


@torch.no_grad()
def _clean(model: Any, hook: str, contexts: list[Tensor], first: int) -> dict[str, Any]:
    dev = next(model.parameters()).device
    lps, ce_clean, ce_zero = [], 0.0, 0.0
    for t in contexts:
        t = t.to(dev)
        clean = model(t)
        ce_clean += _ce(clean, t)
        lps.append(torch.log_softmax(clean[0, first:].float(), -1).cpu())

        def zero(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[:, first:] = 0
            return x

        with model.hooks(fwd_hooks=[(hook, zero)]):
            ce_zero += _ce(model(t), t)
    n_ce = sum(t.shape[1] - 1 for t in contexts)
    return {"lp": lps, "ce_clean": ce_clean / n_ce, "ce_zero": ce_zero / n_ce, "n_ce": n_ce,
            "n_kl": sum(lp.shape[0] for lp in lps)}


def _kl(lp_clean: Tensor, logits: Tensor) -> float:
    q = torch.log_softmax(logits.float(), -1)
    return float((lp_clean.exp() * (lp_clean - q)).sum(-1).double().sum())


@torch.no_grad()
def evaluate_trimmed(model: Any, sae: Any, store: Any, hook: str, *, holdout: float = 0.1, n_fit_rows: int = 20000,
                     ce_contexts: int = 32, seed: int = 0, out_dir: str | os.PathLike | None = None,
                     cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """The metrics of :func:`evals.sae_metrics.evaluate_sae` (module docstring for what differs in the passes)."""
    train, held = store.split(holdout)
    eval_x = store.read(hook, held)
    rec = reconstruction_metrics(sae, eval_x.split(4096))
    r2, n_fit = heldout_error_r2(sae, store, hook, train, eval_x, n_fit_rows=n_fit_rows, seed=seed)

    cfg = store.config
    first = 1 if (cfg.prepend_bos and cfg.exclude_bos) else 0
    contexts = _contexts(store, held, ce_contexts)
    cache = {} if cache is None else cache
    key = (str(store.path), hook, tuple(held), ce_contexts, first)
    if key not in cache:
        cache[key] = _clean(model, hook, contexts, first)
    c = cache[key]
    basis = FeatureBasis(sae, hook=hook)
    mdev = next(model.parameters()).device
    ce_sae = kl_sae = kl_rnd = 0.0
    for k, t in enumerate(contexts):
        t = t.to(mdev)
        mask = torch.ones_like(t, dtype=torch.bool)
        mask[:, :first] = False
        with splice(model, {hook: basis}, error="drop", mask=mask, record=False):
            lg = model(t)
        ce_sae += _ce(lg, t)
        kl_sae += _kl(c["lp"][k], lg[0, first:].cpu())
        with splice(model, {hook: basis}, error="random", mask=mask, seed=seed + k, record=False):
            kl_rnd += _kl(c["lp"][k], model(t)[0, first:].cpu())
    losses = {"ce_clean": c["ce_clean"], "ce_sae": ce_sae / c["n_ce"], "ce_zero": c["ce_zero"],
              "kl_sae": kl_sae / c["n_kl"], "kl_random": kl_rnd / c["n_kl"]}
    losses.update(loss_ratios(losses))
    losses["n_ce_positions"], losses["n_kl_positions"] = c["n_ce"], c["n_kl"]
    density = rec.pop("density")
    metrics = {**rec, "error_linear_r2": r2, **losses, "n_fit_tokens": n_fit,
               "store": str(store.path), "hook": hook, "heldout_shards": held, "fit_shards": train,
               "holdout": holdout, "seed": seed, "ce_contexts": ce_contexts, "passes": "trimmed, clean cached",
               "sae": {"arch": sae.cfg.arch, "centring": sae.cfg.centring, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}}
    return write_metrics(metrics, density, out_dir, sae=sae, hook=hook)
