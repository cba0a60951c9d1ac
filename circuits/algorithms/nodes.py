"""Node-level circuit discovery: attention heads and MLPs (``level="node"``), MLP neurons (``"neuron"``),
and whole blocks of recurrent / state-space models.

- ``node-patch``: exact activation patching, one unit at a time (the component-level patching of Meng et
  al. 2022, "Locating and Editing Factual Associations in GPT", and of Wang et al. 2023's IOI study): a
  unit's score is ``m(unit ablated) - m(clean)`` (:func:`patching.exact.node_patching_scores`).
- ``node-atp``: attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At
  Industrial Scale"; Kramar et al. 2024, "AtP*"): the same effect to first order,
  ``(a(ablated) - a(clean)) . dm/da``, every unit from one forward and backward pass
  (:func:`patching.attribution.atp`).

Selection: the top-k units by ``|score|`` (a count or a fraction of the ablatable units) or those with
``|score| >= threshold``; without a selection, the smallest top-k reaching the faithfulness target
(:mod:`circuits.algorithms.budget`). The inputs and the logits are not units: they are always part of
the circuit.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from circuits.algorithms.base import DiscoveryConfig, DiscoveryResult, register
from circuits.algorithms.budget import smallest_faithful
from circuits.algorithms.engine import attribution_options, patcher_options
from circuits.algorithms.select import select_units
from patching.kinds import parse_node_id, unit_kind


def eligible_units(graph: Any, ids: tuple[str, ...]) -> torch.Tensor:
    """Which scored units discovery may leave out of a circuit: those whose unit kind is ``ablatable``
    (:mod:`patching.kinds`: heads, MLPs, neurons, blocks, features; not the inputs, the logits or error nodes).
    An id the graph does not list is read by :func:`patching.kinds.parse_node_id`."""
    kinds = {n.id: n.kind for n in graph.nodes}
    return torch.tensor([unit_kind(kinds[i] if i in kinds else parse_node_id(i)["kind"]).ablatable for i in ids],
                        dtype=torch.bool)


def _select(model: Any, graph: Any, batch: Any, scores: Any, config: DiscoveryConfig, method: str, level: str,
            t0: float, ablations: int) -> DiscoveryResult:
    ok = eligible_units(graph, scores.ids)
    fp = int(scores.forward_passes)
    if config.threshold is not None or config.topk is not None or config.topk_fraction is not None:
        kept = select_units(scores.values, eligible=ok, topk=config.topk, topk_fraction=config.topk_fraction,
                            threshold=config.threshold)
        stats: dict[str, float] = {}
    else:
        cols = torch.tensor([graph.node_index[i] for i in scores.ids], dtype=torch.long)
        ablatable = torch.zeros(len(graph.nodes), dtype=torch.bool)
        ablatable[cols[ok]] = True

        def ablate(kept_units: torch.Tensor) -> torch.Tensor:
            out = ablatable.clone()
            out[cols[kept_units]] = False
            return out

        kept, stats, fp2, ab2 = smallest_faithful(
            model, graph, batch, config, level=level, n_units=int(ok.sum()),
            build=lambda k: select_units(scores.values, eligible=ok, topk=k), ablate=ablate)
        fp, ablations = fp + fp2, ablations + ab2
    stats["units"] = int(ok.sum())
    return DiscoveryResult(scores=scores, kept=kept, level=level, method=method, forward_passes=fp,
                           ablations=ablations, seconds=time.perf_counter() - t0, stats=stats)


@register("node-patch", levels=("node", "neuron"), default_metric="task", selection="topk",
          needs_edges=False)
def node_patch(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """Exact node patching: ablate each head / MLP / neuron alone, keep the largest effects."""
    from patching.exact import node_patching_scores

    level = config.level or "node"
    t0 = time.perf_counter()
    scores = node_patching_scores(model, graph, batch, ablation=config.ablation,
                                  metric=config.metric or "logit_diff", level=level, per_position=config.per_position,
                                  chunk_size=config.chunk_size, **patcher_options(node_patching_scores, config))
    ablations = int(eligible_units(graph, scores.ids).sum())
    return _select(model, graph, batch, scores, config, "node-patch", level, t0, ablations)


@register("node-atp", levels=("node", "neuron"), default_metric="task", selection="topk",
          needs_edges=False, gradient=True)
def node_atp(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """AtP (Nanda 2023; Kramar et al. 2024): first-order node attribution, keep the largest effects."""
    from patching.attribution import atp

    level = config.level or "node"
    t0 = time.perf_counter()
    scores = atp(model, graph, batch, ablation=config.ablation, metric=config.metric or "logit_diff", level=level,
                 per_position=config.per_position, **attribution_options(atp, config))
    return _select(model, graph, batch, scores, config, "node-atp", level, t0, 0)
