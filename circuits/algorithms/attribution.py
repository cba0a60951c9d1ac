"""EAP and EAP-IG circuit discovery: score every edge by attribution, keep the best, prune to connected.

- EAP, edge attribution patching (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms Automated
  Circuit Discovery"): the effect of ablating edge ``s -> r`` is estimated to first order as
  ``(a_s(ablated) - a_s(clean)) . dm/d(input of r)``, every edge from one forward and one backward pass
  (:func:`patching.attribution.eap`).
- EAP-IG (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness: Going Beyond Circuit Overlap When
  Finding Model Mechanisms"): the gradient is averaged over ``ig_steps`` points on the straight path from
  the ablated to the clean input, as in integrated gradients (:func:`patching.attribution.eap_ig`).

Selection: keep the edges with ``|score| >= threshold``, or the top-k edges by ``|score|`` (a count or a
fraction of all edges); then drop every kept edge that is not on a path from the inputs to the logits
(:func:`circuits.algorithms.select.prune_to_connected`), i.e. nodes not connected to both ends. For top-k,
k counts the edges of the connected circuit: the longest prefix of the ranking whose connected part has at
most k edges (:func:`circuits.algorithms.select.top_connected`), so ``--topk 20`` gives a circuit of up
to 20 edges even when the 20 best-scored edges alone would not connect the inputs to the logits.
Without a selection, k is the smallest candidate size whose circuit reaches the faithfulness target
(:mod:`circuits.algorithms.budget`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from circuits.algorithms.base import DiscoveryConfig, DiscoveryResult, register
from circuits.algorithms.budget import smallest_faithful
from circuits.algorithms.engine import attribution_options
from circuits.algorithms.select import prune_to_connected, select_units, top_connected


def _select(model: Any, graph: Any, batch: Any, scores: Any, config: DiscoveryConfig, method: str,
            t0: float) -> DiscoveryResult:
    fp, ablations = int(scores.forward_passes), 0
    if config.threshold is not None:
        top = select_units(scores.values, threshold=config.threshold)
        kept = prune_to_connected(graph, top)
        stats = {"selected": int(top.sum()), "dropped_unconnected": int((top & ~kept).sum())}
    elif config.topk is not None or config.topk_fraction is not None:
        n = len(graph.edges)
        k = config.topk if config.topk is not None else max(1, int(math.floor(config.topk_fraction * n + 0.5)))
        kept = top_connected(graph, scores.values, k)
        stats = {"budget": k}
    else:
        kept, stats, fp2, ablations = smallest_faithful(
            model, graph, batch, config, level="edge", n_units=len(graph.edges),
            build=lambda k: top_connected(graph, scores.values, k), ablate=lambda c: ~c)
        fp += fp2
    return DiscoveryResult(scores=scores, kept=kept.cpu(), level="edge", method=method, forward_passes=fp,
                           ablations=ablations, seconds=time.perf_counter() - t0, stats=stats)


def _check(graph: Any, method: str) -> None:
    if not getattr(graph, "supports_edges", True):
        raise ValueError(f"{method}: this model's graph does not support edge patching; use a node method")


@register("eap", levels=("edge",), default_metric="task", selection="topk", gradient=True)
def eap(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """EAP (Syed et al. 2023): first-order edge attribution, then top-k and connectivity pruning."""
    from patching.attribution import eap as eap_scores

    _check(graph, "eap")
    t0 = time.perf_counter()
    scores = eap_scores(model, graph, batch, ablation=config.ablation, metric=config.metric or "logit_diff",
                        per_position=config.per_position, **attribution_options(eap_scores, config))
    return _select(model, graph, batch, scores, config, "eap", t0)


@register("eap-ig", levels=("edge",), default_metric="task", selection="topk", gradient=True)
def eap_ig(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """EAP-IG (Hanna et al. 2024): edge attribution with integrated gradients, then top-k and pruning."""
    from patching.attribution import eap_ig as eap_ig_scores

    _check(graph, "eap-ig")
    t0 = time.perf_counter()
    scores = eap_ig_scores(model, graph, batch, ablation=config.ablation, metric=config.metric or "logit_diff",
                           steps=config.ig_steps, per_position=config.per_position,
                           **attribution_options(eap_ig_scores, config))
    return _select(model, graph, batch, scores, config, "eap-ig", t0)
