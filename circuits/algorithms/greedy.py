"""Greedy edge pruning to a faithfulness target: a minimal faithful circuit by exact backward elimination.

The problem is the one Edge Pruning solves (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge
Pruning", NeurIPS 2024): the fewest edges whose circuit stays faithful to the model. Edge Pruning relaxes
the edge masks to continuous hard-concrete gates and trades sparsity against faithfulness by gradient
descent; here every decision is an exact activation-patching measurement instead, as in ACDC (Conmy et al.
2023), but where ACDC visits each edge once against a fixed threshold tau, this search re-measures every
remaining edge at every step and stops at a faithfulness target (backward elimination, as in stepwise
regression).

Algorithm. Faithfulness of a circuit C (the edges kept; every other edge ablated) on the metric m, mean over
the prompts (:mod:`patching.faithfulness`)::

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

1. Start from C0: the full graph, or with a warm start (``--warm-start`` / ``--topk``, k edges) the EAP-IG
   top-k connected circuit (Hanna et al. 2024; :func:`circuits.algorithms.select.top_connected`), grown along
   the EAP-IG ranking to the smallest candidate size (k, then the budget grid above k, then all edges) whose f
   reaches the target. The warm start's EAP-IG goes through the same gradient-metric check as EAP-IG itself.
2. Repeat: for every edge e of C build the candidate ``C - e`` reduced to its input -> logits connected part
   (edges off every such path carry nothing under resample ablation); measure f of every distinct candidate
   with the engine (:class:`patching.exact.EdgePatcher`, all candidates of a step in batched calls); take the
   candidate of highest f (ties: fewer edges, then the lower index of the removed edge). If its f is below
   ``config.faithfulness_target``, stop; else C becomes that candidate.

The result reaches the target (when C0 does) and is locally minimal: removing any one of its edges drops f
below the target. Greedy elimination is not guaranteed to find the globally smallest such circuit. Cost:
the engine's setup passes plus ``sum |C|`` ablation masks over the steps (``|C0|^2 / 2`` at most), so a
warm start (``--topk``) matters on larger graphs. Deterministic: the measurements and the tie-breaks depend
only on the model, the prompts and the config.

Scores (``m(ablated) - m(clean)`` convention, metric units): a removed edge gets ``m(C - e) - m(C)``
measured at the step that removed it (0 for edges dropped only because they became disconnected, and for
edges outside C0); a kept edge gets ``m(C - e) - m(C)`` measured against the final circuit. These are
changes against different circuits, not per-edge effects, so the result also carries a ranking by removal
order (``ranking_kind="removal-order"``): an edge removed at step t ranks t (later = more important; edges
dropped as disconnected at step t rank with it), the final circuit's edges above every removed one (by
``|score|`` against the final circuit, or with ``config.full_ranking`` by the steps of an elimination
continued past the target down to the empty circuit, ``|C|^2 / 2`` more masks), and the edges outside C0
below all of them (by EAP-IG ``|score|`` when warm-started).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.algorithms.base import DiscoveryConfig, DiscoveryResult, register
from circuits.algorithms.select import Connectivity

log = logging.getLogger(__name__)


class _Measure:
    """Mean metric and faithfulness of kept-edge masks through one EdgePatcher, in blocks of its chunk size."""

    def __init__(self, patcher: Any):
        from patching.faithfulness import full_and_empty, patcher_faithfulness

        self.patcher = patcher
        self.full, self.empty = full_and_empty(patcher)
        patcher_faithfulness(patcher, self.full)  # FaithfulnessUndefined (one line) before any search
        self.device = patcher.clean_metric.device

    def metric(self, kept: Bool[Tensor, "K E"], bar: Any = None) -> Float[Tensor, " K"]:
        """Mean metric of each kept-edge mask; ``bar`` (a tqdm) advances by the masks measured."""
        step = max(1, int(getattr(self.patcher, "chunk_size", 0) or len(kept)))
        out = []
        for i in range(0, len(kept), step):
            out.append(self.patcher.run(~kept[i:i + step].to(self.device)).double().mean(-1).cpu())
            if bar is not None:
                bar.update(len(out[-1]))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def based(self, kept: Bool[Tensor, " E"]) -> Any:
        """Measure relative to the circuit ``kept`` (each candidate re-runs from its first changed receiver)."""
        return self.patcher.based_on(~kept.to(self.device))

    def faithfulness(self, values: Float[Tensor, " K"]) -> Float[Tensor, " K"]:
        from patching.faithfulness import patcher_faithfulness

        return patcher_faithfulness(self.patcher, values)


def warm_start(model: Any, graph: Any, batch: Any, config: DiscoveryConfig, measure: _Measure,
               conn: Connectivity) -> tuple[Bool[Tensor, " E"], Float[Tensor, " E"], dict[str, float], int]:
    """C0 from the EAP-IG ranking: the smallest connected top-k (k = the config's warm-start size, then the
    budget grid above k, then every edge) whose faithfulness reaches the target. Returns C0, the EAP-IG
    scores, stats and EAP-IG's forward passes."""
    from circuits.algorithms.budget import budgets
    from circuits.algorithms.engine import warm_start_scores
    from circuits.algorithms.select import top_connected

    n = len(graph.edges)
    k = config.warm_start_size(n)
    scores = warm_start_scores(model, graph, batch, config)
    sizes = sorted({k, n, *(b for b in budgets(n) if b > k)})
    cands = torch.stack([top_connected(graph, scores.values, s) for s in sizes])
    cands = conn(cands)
    faith = measure.faithfulness(measure.metric(cands))
    ok = torch.nonzero(faith >= config.faithfulness_target).flatten()
    pick = int(ok[0]) if len(ok) else int(torch.argmax(faith))
    stats = {"start_topk": k, "start_budget": sizes[pick], "start_candidates": len(sizes)}
    return cands[pick], scores.values.detach().double().cpu(), stats, int(scores.forward_passes)


@register("greedy", levels=("edge",), default_metric="task", selection="target", warm_start=True)
def greedy(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """Greedy edge pruning: remove the least harmful edge while faithfulness stays >= the target."""
    from circuits.algorithms.engine import patcher_options
    from patching.exact import EdgePatcher
    from patching.scores import Scores

    graph.require_edges("greedy")
    if config.threshold is not None:
        raise ValueError("greedy: --threshold does not apply; greedy stops at the faithfulness target (--target), "
                         "and --topk / --warm-start set the size of its EAP-IG warm start")
    if config.topk is not None or config.topk_fraction is not None:  # a config not passed through resolve_config
        from dataclasses import replace

        config = replace(config, warm_start=config.topk, warm_start_fraction=config.topk_fraction, topk=None,
                         topk_fraction=None)
    metric = config.metric or "logit_diff"
    t0 = time.perf_counter()
    patcher = EdgePatcher(model, graph, batch, ablation=config.ablation, metric=metric,
                          per_position=config.per_position, chunk_size=config.chunk_size,
                          **patcher_options(EdgePatcher, config))
    measure = _Measure(patcher)
    conn = Connectivity(graph)
    n = len(graph.edges)
    stats: dict[str, float] = {}
    extra_passes = 0
    outside = torch.full((n,), -math.inf, dtype=torch.float64)  # ranking of the edges outside C0
    if config.warm_start_size(n) is not None:
        kept, ig, stats, extra_passes = warm_start(model, graph, batch, config, measure, conn)
        mag = ig.abs().nan_to_num(nan=-1.0)
        outside = -2.0 + mag / (2.0 * float(mag.max()) + 1.0)  # in (-2, -1.5): below every C0 edge, by |EAP-IG|
    else:
        kept = conn(torch.ones(1, n, dtype=torch.bool))[0]
    start = kept.clone()
    _warn_cost(measure, conn, kept)
    kept, effect, step, run_stats = eliminate(measure, conn, kept, config.faithfulness_target,
                                              progress=config.progress, to_empty=config.full_ranking,
                                              multi=config.multi_removal)
    stats.update(run_stats)
    ranking = torch.where(start, step, outside)
    if not config.full_ranking:  # the final circuit above every removed edge, by |effect| against it
        top = float(step[start & ~kept].max()) + 1.0 if bool((start & ~kept).any()) else 0.0
        mag = effect.abs()
        ranking[kept] = top + 1.0 + mag[kept] / (float(mag[kept].max()) + 1.0) if bool(kept.any()) else 0.0
    fp = int(patcher.forward_passes) + extra_passes
    ab = int(patcher.ablations)
    stats.update(forward_passes=fp, ablations=ab, metric_clean=measure.full, metric_ablated=measure.empty)
    seconds = time.perf_counter() - t0
    scores = Scores(graph=graph, level="edge", values=effect.float(), ids=tuple(e.id for e in graph.edges),
                    method="greedy", ablation=config.ablation, metric=metric, forward_passes=fp, seconds=seconds)
    log.info("greedy: kept %d/%d edges, faithfulness %.4f (target %.3g), %d forward passes, %d ablations, %.2fs",
             int(kept.sum()), n, stats["faithfulness_final"], config.faithfulness_target, fp, ab, seconds)
    return DiscoveryResult(scores=scores, kept=kept, level="edge", method="greedy", forward_passes=fp,
                           ablations=ab, seconds=seconds, stats=stats, ranking=ranking,
                           ranking_kind="removal-order")


def _warn_cost(measure: _Measure, conn: Connectivity, kept: Bool[Tensor, " E"], limit_s: float = 600.0) -> None:
    """Warn, before the search, when one elimination step (``|C0|`` masks) will take longer than ``limit_s``,
    from the time of one measured mask."""
    n = int(kept.sum())
    if n < 64:
        return
    t0 = time.perf_counter()
    measure.metric(kept[None])
    per = time.perf_counter() - t0
    if n * per > limit_s:
        log.warning("greedy: the start circuit has %d edges, so each elimination step measures up to %d masks: "
                    "about %.0f min for the first step at %.2f s per mask here; a smaller --warm-start (with a "
                    "lower --target) or fewer prompts shortens it", n, n, n * per / 60, per)


def eliminate(measure: _Measure, conn: Connectivity, kept: Bool[Tensor, " E"], target: float, *,
              progress: bool = False, to_empty: bool = False, multi: bool = False
              ) -> tuple[Bool[Tensor, " E"], Float[Tensor, " E"], Float[Tensor, " E"], dict[str, float]]:
    """Backward elimination from ``kept`` (module docstring, step 2) over any ``measure`` with
    ``metric(kept [K, E]) -> [K]`` and ``faithfulness(values) -> [K]``.

    ``multi``: each step (before the target is reached) removes the longest prefix of 1, 2, 4, ... of the
    candidates ranked by their single-removal faithfulness whose *joint* removal (measured, one extra batched
    call) keeps f >= target, instead of the best one alone: about log steps where one-at-a-time takes |C|.
    The result still reaches the target and is locally minimal (it stops only when no single removal keeps
    the target), but need not equal one-at-a-time elimination.

    Returns the kept mask at the target, the per-edge effects (metric units), the removal step of every
    edge of the start circuit (``[E]`` float64; ``inf`` for edges still kept; with ``to_empty`` the
    elimination continues past the target, one edge at a time, until nothing is left, so every start edge
    gets a finite step) and stats.
    """
    kept = kept.clone().cpu()
    effect = torch.zeros(len(kept), dtype=torch.float64)
    step_of = torch.full((len(kept),), math.inf, dtype=torch.float64)
    current = float(measure.metric(kept[None])[0])
    start_edges, start_faith = int(kept.sum()), float(measure.faithfulness(torch.tensor([current]))[0])
    steps = removed_explicitly = 0
    final: tuple[torch.Tensor, float] | None = None  # the circuit at the target and its metric
    with tqdm(total=start_edges, desc="greedy", unit="edge", disable=not progress, dynamic_ncols=True) as bar:
        while True:
            edges = torch.nonzero(kept).flatten()
            if len(edges) == 0:
                break
            cands = kept.repeat(len(edges), 1)
            cands[torch.arange(len(edges)), edges] = False
            cands = conn(cands)
            uniq, inverse = torch.unique(cands, dim=0, return_inverse=True)
            based = measure.based(kept) if hasattr(measure, "based") and len(uniq) > 2 else nullcontext()
            with based, tqdm(total=len(uniq), desc=f"greedy step {steps + 1}: {len(edges)} edges", unit="mask",
                      disable=not progress, leave=False, dynamic_ncols=True) as inner:  # a step's own ETA
                values = (measure.metric(uniq, inner) if isinstance(measure, _Measure)  # any measure works;
                          else measure.metric(uniq))[inverse]            # [C] metric of each candidate
            faith = measure.faithfulness(values)
            sizes = cands.sum(1)
            # best first: highest f, then fewer edges left, then the lower removed-edge index
            order = sorted(range(len(edges)), key=lambda i: (-float(faith[i]), int(sizes[i]), i))
            best = order[0]
            if final is None and float(faith[best]) < target:
                effect[edges] = values - current                         # kept edges: against the final circuit
                final = (kept.clone(), current)
                if not to_empty:
                    break
            take, new_kept, new_value = [best], cands[best], float(values[best])
            if multi and final is None:
                ok = [i for i in order if float(faith[i]) >= target]
                rs = sorted({min(2 ** j, len(ok)) for j in range(len(ok).bit_length() + 1)} - {0, 1})
                if rs:
                    joint = torch.stack([kept.clone() for _ in rs])
                    for row, r in enumerate(rs):
                        joint[row, edges[ok[:r]]] = False
                    joint = conn(joint)
                    jv = measure.metric(joint)
                    good = [row for row in range(len(rs)) if float(measure.faithfulness(jv[row:row + 1])[0]) >= target]
                    if good:
                        row = good[-1]
                        take, new_kept, new_value = ok[:rs[row]], joint[row], float(jv[row])
            gone = kept & ~new_kept
            step_of[gone] = float(steps)
            if final is None:
                for i in take:
                    effect[int(edges[i])] = float(values[i]) - current
                removed_explicitly += len(take)
                bar.update(int(gone.sum()))
                bar.set_postfix(kept=int(new_kept.sum()), faithfulness=f"{float(faith[best]):.4f}", refresh=False)
            kept, current = new_kept, new_value
            steps += 1
    if final is None:  # every edge could go without falling below the target
        final = (kept.clone(), current)
    kept, current = final
    n_final = int(kept.sum())
    f_final = float(measure.faithfulness(torch.tensor([current]))[0])
    stats = {"faithfulness_target": target, "start_edges": start_edges, "start_faithfulness": start_faith,
             "faithfulness_final": f_final, "metric_final": current, "steps": removed_explicitly,
             "dropped_unconnected": start_edges - n_final - removed_explicitly,
             "target_reached": int(f_final >= target), "ranked_to_empty": int(to_empty), "multi_removal": int(multi)}
    return kept, effect, step_of, stats
