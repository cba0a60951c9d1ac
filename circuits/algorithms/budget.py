"""Default circuit size for the scoring methods: the smallest top-k circuit that is faithful enough.

A fixed top fraction suits no model size (10 % of a 29-edge model is 3 edges, of GPT-2 small 3,000), so
when no ``topk`` / ``topk_fraction`` / ``threshold`` is given, the scoring methods (EAP, EAP-IG, node
patching, AtP) build the top-k circuits for a grid of sizes (:data:`FRACTIONS` of the units), measure
all of them with the exact engine in ONE batched call, and keep the smallest whose faithfulness

    f = (m(circuit) - m(empty)) / (m(full) - m(empty))

on the method's metric reaches ``config.faithfulness_target`` (the largest-f candidate if none does); f is
:func:`patching.faithfulness.faithfulness` (the empty circuit ablates everything, the embeddings included;
a metric that does not move between the full model and the empty circuit is a one-line error).
This costs the engine's setup passes plus one call of at most ``len(FRACTIONS)`` masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.algorithms.base import DiscoveryConfig

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def budgets(n_units: int) -> list[int]:
    """Distinct candidate sizes ``round(f * n_units)`` (at least 1) for f in :data:`FRACTIONS`."""
    return sorted({max(1, min(n_units, int(math.floor(f * n_units + 0.5)))) for f in FRACTIONS})


def smallest_faithful(model: Any, graph: Any, batch: Any, config: DiscoveryConfig, *, level: str,
                      n_units: int, build: Callable[[int], Bool[Tensor, " U"]],
                      ablate: Callable[[Bool[Tensor, " U"]], Bool[Tensor, " M"]]
                      ) -> tuple[Bool[Tensor, " U"], dict[str, float], int, int]:
    """The smallest candidate circuit ``build(k)`` (k in :func:`budgets`) reaching the faithfulness target.

    ``build(k)`` returns the kept mask over the scored units; ``ablate(kept)`` the engine mask of what
    to ablate (over edges for ``level="edge"``, else over the graph's nodes). Returns the kept mask,
    stats, and the engine's forward passes and ablations.
    """
    from circuits.algorithms.engine import patcher_options
    from patching.exact import EdgePatcher, NodePatcher
    from patching.faithfulness import mean_metric, patcher_faithfulness

    ks = budgets(n_units)
    kept = [build(k) for k in ks]
    masks = torch.stack([ablate(c) for c in kept])
    cls = EdgePatcher if level == "edge" else NodePatcher
    patcher = cls(model, graph, batch, ablation=config.ablation, metric=config.metric or "logit_diff",
                  per_position=config.per_position, chunk_size=config.chunk_size, **patcher_options(cls, config))
    values = mean_metric(patcher.run(masks.to(patcher.clean_metric.device))).cpu()
    faith = patcher_faithfulness(patcher, values).tolist()
    target = config.faithfulness_target
    ok = [i for i, f in enumerate(faith) if f >= target]
    if ok:
        best = ok[0]
    else:  # the most faithful candidate (the smallest among equals)
        best = max(range(len(ks)), key=lambda i: (faith[i], -i))
    stats = {"budget": ks[best], "budget_faithfulness": faith[best], "faithfulness_target": target,
             "budget_reached": int(bool(ok))}
    return kept[best], stats, int(patcher.forward_passes), int(patcher.ablations)
