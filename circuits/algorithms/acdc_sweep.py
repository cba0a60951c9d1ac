"""A sweep of ACDC's threshold tau: one ACDC run per tau, as Conmy et al. (2023) draw ACDC's ROC curves.

ACDC returns a circuit, not a score per edge: the value it records for an edge is the metric change measured
against whatever had been removed before it. Conmy et al. therefore evaluate ACDC by running it at many
thresholds tau and placing each run's circuit as one (FPR, TPR) point (:func:`evals.ground_truth.roc_from_circuits`).
This module runs that sweep:

* taus: ``n_taus`` values spaced geometrically from ``1e-4 * scale`` to ``scale`` (``scale = |m(full) -
  m(empty)|``, the metric's range on these prompts, so the grid suits any metric), plus the config's own tau
  (its run is the sweep's reported circuit);
* every run is exact sequential ACDC (:func:`circuits.algorithms.acdc.run_acdc`) on ONE engine patcher
  (the clean and ablated activations are captured once), and work is reused: each trial mask's metric is
  cached, so the decisions two taus share (every run is the same until its first decision that depends on
  tau) are measured once, and each run's speculation starts from the previous run's measurements. Reuse
  changes the cost, never a circuit: each equals a fresh ACDC run at its tau.

For faithfulness curves, which need circuits of given sizes, the sweep also ranks the edges
(``ranking_kind="acdc-tau"``): by the largest tau whose circuit keeps the edge, then by the number of taus
that keep it; edges no tau keeps come last, by the ``|change|`` the smallest tau's run measured when it tried
them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.algorithms.acdc import DEFAULT_TAU, initial_removed, make_result, run_acdc
from circuits.algorithms.base import DIVERGENCE_METRICS, DiscoveryConfig, DiscoveryResult

log = logging.getLogger(__name__)

N_TAUS = 12
TAU_RANGE = 1e-4  # smallest tau of the default grid, relative to the metric's range


class CachedPatcher:
    """An EdgePatcher whose ``run`` measures each distinct mask once (mean metric cached per mask).

    ``run`` returns ``[K, 1]`` (the mean over prompts, all ACDC reads); ``forward_passes`` / ``ablations``
    count the engine's real work.
    """

    def __init__(self, patcher: Any):
        self.patcher = patcher
        self.cache: dict[bytes, float] = {}
        self.hits = 0

    def __getattr__(self, name: str) -> Any:  # clean_metric, ablated_metric, forward_passes, ablations, device
        return getattr(self.patcher, name)

    def run(self, masks: Bool[Tensor, "K E"]) -> Float[Tensor, "K 1"]:
        keys = [bytes(m.cpu().numpy().tobytes()) for m in masks]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                first.setdefault(k, i)
        rows = sorted(first.values())
        if rows:
            vals = self.patcher.run(masks[rows]).double().mean(-1).cpu().tolist()
            self.cache.update({keys[i]: v for i, v in zip(rows, vals, strict=True)})
        self.hits += len(keys) - len(rows)
        return torch.tensor([[self.cache[k]] for k in keys], dtype=torch.float64)


@dataclass(frozen=True)
class SweepResult:
    """The circuits of an ACDC tau sweep.

    Attributes:
        taus: the thresholds, increasing.
        circuits: ``[T, E]`` kept edges of the run at each tau.
        result: the DiscoveryResult at the config's tau, ranked by the sweep (``ranking_kind="acdc-tau"``).
        stats: per-tau numbers (``kept``, ``forward_passes``, ``ablations``, ``seconds``), one dict per tau.
        forward_passes / ablations / seconds: the whole sweep's cost (engine setup included).
    """

    taus: tuple[float, ...]
    circuits: Bool[Tensor, "T E"]
    result: DiscoveryResult
    stats: tuple[dict[str, float], ...]
    forward_passes: int
    ablations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"taus": list(self.taus), "kept": [int(c.sum()) for c in self.circuits],
                "stats": [dict(s) for s in self.stats], "forward_passes": self.forward_passes,
                "ablations": self.ablations, "seconds": self.seconds}


def default_taus(scale: float, tau: float, n: int = N_TAUS) -> list[float]:
    """``n`` taus spaced geometrically over ``[1e-4 * scale, scale]`` plus ``tau``, increasing, distinct."""
    scale = abs(scale) if math.isfinite(scale) and scale > 0 else 1.0
    lo, hi = math.log10(TAU_RANGE * scale), math.log10(scale)
    grid = [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)] if n > 1 else [scale]
    return sorted({float(f"{t:.6g}") for t in grid} | {float(tau)})


def sweep_ranking(taus: list[float], circuits: Bool[Tensor, "T E"],
                  effect: Float[Tensor, " E"] | None = None) -> Float[Tensor, " E"]:
    """Importance of each edge: the index of the largest tau keeping it, plus (count of taus keeping it) / (T + 1)
    as the tie-break. Edges no tau keeps rank below, in ``(-1, 0)``: by ``|effect|`` (the change measured when
    the smallest tau's run tried them; NaN and untried edges at -1) when given, else all at -1."""
    T = len(taus)
    idx = torch.arange(T, dtype=torch.float64)[:, None].expand(T, circuits.shape[1])
    largest = torch.where(circuits, idx, torch.full_like(idx, -math.inf)).amax(0)
    count = circuits.sum(0).double()
    low = torch.full_like(largest, -1.0)
    if effect is not None:
        mag = effect.detach().double().cpu().abs().nan_to_num(nan=0.0)
        low = -1.0 + mag / (float(mag.max()) + 1.0)
    return torch.where(count > 0, largest + count / (T + 1), low)


def run_sweep(patcher: Any, graph: Any, config: DiscoveryConfig, taus: list[float], *,
              removed: torch.Tensor | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor, dict]], list[dict]]:
    """ACDC (:func:`circuits.algorithms.acdc.run_acdc`) at each tau of ``taus`` over any patcher, with each
    mask measured once (:class:`CachedPatcher`) and each run's guesses taken from the previous run's
    measurements. Returns per tau ``(kept, effect, stats)`` and ``{tau, kept, forward_passes, ablations,
    seconds}`` (the engine work that tau added)."""
    cached = CachedPatcher(patcher)
    run_cfg = replace(config, checkpoint=None, resume=False)
    use_abs = (config.metric or "kl") not in DIVERGENCE_METRICS
    runs, per_tau = [], []
    guesses: dict[int, bool] = {}
    for tau in taus:
        fp0, ab0, s0 = int(patcher.forward_passes), int(patcher.ablations), time.perf_counter()
        kept, effect, stats, _ = run_acdc(cached, graph, replace(run_cfg, threshold=tau), removed=removed,
                                          guesses=guesses)
        measured = ~torch.isnan(effect) & (effect != 0)
        guesses = {int(e): bool((abs(effect[e]) if use_abs else effect[e]) < tau)
                   for e in torch.nonzero(measured).flatten().tolist()}
        runs.append((kept, effect, stats))
        per_tau.append({"tau": tau, "kept": int(kept.sum()), "forward_passes": int(patcher.forward_passes) - fp0,
                        "ablations": int(patcher.ablations) - ab0, "seconds": time.perf_counter() - s0,
                        "cache_hits": cached.hits})
        log.info("acdc sweep: tau %.3g keeps %d edges (%d new masks)", tau, int(kept.sum()), per_tau[-1]["ablations"])
    return runs, per_tau


def acdc_sweep(model: Any, graph: Any, batch: Any, config: DiscoveryConfig, *, taus: list[float] | None = None,
               n_taus: int = N_TAUS) -> SweepResult:
    """Run ACDC at every tau of ``taus`` (default :func:`default_taus`) on one cached patcher (module docstring).

    ``config`` is resolved (metric, warm start as for :func:`circuits.algorithms.acdc.acdc`); its threshold
    is the tau of the reported result and is always part of the sweep. Checkpointing is per run and not
    used here (``config.checkpoint`` is ignored).
    """
    from circuits.algorithms.engine import patcher_options
    from patching.exact import EdgePatcher

    graph.require_edges("acdc sweep")
    metric = config.metric or "kl"
    t0 = time.perf_counter()
    patcher = EdgePatcher(model, graph, batch, ablation=config.ablation, metric=metric,
                          per_position=config.per_position, chunk_size=config.chunk_size,
                          **patcher_options(EdgePatcher, config))
    removed0, warm_stats, warm_passes = initial_removed(model, graph, batch, config)
    tau0 = DEFAULT_TAU if config.threshold is None else float(config.threshold)
    scale = float(patcher.clean_metric.double().mean() - patcher.ablated_metric.double().mean())
    taus = sorted({float(t) for t in taus} | {tau0}) if taus is not None else default_taus(scale, tau0, n_taus)
    runs, per_tau = run_sweep(patcher, graph, replace(config, metric=metric), taus, removed=removed0)
    C = torch.stack([kept for kept, _, _ in runs])
    kept, effect, stats = runs[taus.index(tau0)]
    seconds = time.perf_counter() - t0
    fp = int(patcher.forward_passes) + warm_passes
    stats = {**stats, **warm_stats, "forward_passes": fp, "ablations": int(patcher.ablations),
             "sweep_taus": len(taus), "sweep_cache_hits": per_tau[-1]["cache_hits"]}
    single = make_result(graph, replace(config, threshold=tau0), metric, kept, effect, stats, seconds)
    result = replace(single, ranking=sweep_ranking(taus, C, runs[0][1]), ranking_kind="acdc-tau")
    return SweepResult(taus=tuple(taus), circuits=C, result=result, stats=tuple(per_tau), forward_passes=fp,
                       ablations=int(patcher.ablations), seconds=seconds)


__all__ = ["acdc_sweep", "run_sweep", "SweepResult", "CachedPatcher", "default_taus", "sweep_ranking", "N_TAUS"]
