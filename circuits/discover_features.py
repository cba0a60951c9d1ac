"""``discover_features(model, task, method, bases) -> CircuitGraph``: feature circuits (Marks et al. 2024,
*Sparse Feature Circuits*) over SAE features and error nodes of spliced sites (:mod:`patching.features`).

Methods (levels):

=============  ===============  ============================================================================
method         level            scores
=============  ===============  ============================================================================
``node-atp``   ``feature``      AtP of every candidate feature and error node (one forward + backward)
``node-ig``    ``feature``      integrated gradients per site (Marks et al.'s node IG)
``node-patch`` ``feature``      exact patching of each node alone
``eap``        ``feature-edge`` EAP of every feature/error -> feature / logits edge
``eap-ig``     ``feature-edge`` EAP-IG of the same edges
=============  ===============  ============================================================================

Selection as for the other scoring methods (:mod:`circuits.algorithms.budget`): ``topk`` / ``topk_fraction`` /
``threshold`` on ``|score|``, else the smallest top-k (k over the same grid of fractions) whose faithfulness
reaches ``faithfulness_target``, all candidate circuits measured in one batched :class:`FeaturePatcher` call.
An edge circuit's nodes are those on a kept edge that reaches ``logits`` through kept edges.

Faithfulness ``f = (m(C) - m(empty)) / (m(full) - m(empty))`` is measured by node ablation: ``C`` ablates every
candidate feature and error node outside the circuit; ``empty`` ablates all of them (the feature graph's fully
ablated run). Non-candidate features stay clean throughout, so ``f`` is relative to the candidates. Held-out
prompts (``eval_prompts``) reuse the candidates found on the discovery prompts.

This module knows bases only through :class:`patching.basis.Basis`; loading SAE directories is the CLI's
(:mod:`circuits.cli_discover`, which imports ``explainers`` lazily for it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.algorithms import DiscoveryConfig

log = logging.getLogger(__name__)

FEATURE_METHODS: dict[str, tuple[str, str]] = {
    "node-atp": ("feature", "atp"), "node-ig": ("feature", "ig"), "node-patch": ("feature", "patch"),
    "eap": ("feature-edge", "eap"), "eap-ig": ("feature-edge", "eap-ig"),
}


def check_feature_method(method: str, metric: str | None = None, steps: int = 5) -> tuple[str, str]:
    """``(level, engine method)`` of a feature-level method; one-line ``ValueError`` otherwise (no weights)."""
    if method not in FEATURE_METHODS:
        raise ValueError(f"--level feature: method {method!r} does not apply to feature circuits; choose one of "
                         f"{', '.join(FEATURE_METHODS)}")
    level, m = FEATURE_METHODS[method]
    if metric is not None and m != "patch":
        from patching.attribution import check_gradient_metric

        check_gradient_metric({"atp": "atp", "ig": "eap_ig", "eap": "eap", "eap-ig": "eap_ig"}[m], metric,
                              steps=steps if m in ("ig", "eap-ig") else None)
    return level, m


def connected_nodes(fgraph: Any, kept_edges: Bool[Tensor, " E"]) -> Bool[Tensor, " N"]:
    """Nodes on a kept edge from which ``logits`` is reachable along kept edges (``logits`` itself included)."""
    into: dict[int, list[int]] = {}
    for e, k in zip(fgraph.edges, kept_edges.tolist(), strict=True):
        if k:
            into.setdefault(fgraph.node_index[e.receiver], []).append(fgraph.node_index[e.sender])
    seen = {fgraph.logits_index}
    stack = [fgraph.logits_index]
    while stack:
        for s in into.get(stack.pop(), []):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    out = torch.zeros(fgraph.n_nodes, dtype=torch.bool)
    out[list(seen)] = True
    return out


def _ranked(values: Tensor, n: int) -> Tensor:
    return torch.argsort(values[:n].abs(), descending=True, stable=True)


def node_circuit(fgraph: Any, level: str, values: Tensor, k: int) -> tuple[Bool[Tensor, " U"], Bool[Tensor, " N"]]:
    """The top-``k`` units by ``|score|`` (kept mask over the scored ids) and the circuit's nodes."""
    n_units = fgraph.n_nodes - 1 if level == "feature" else fgraph.n_edges
    kept = torch.zeros(len(values), dtype=torch.bool)
    kept[_ranked(values, n_units)[:k]] = True
    if level == "feature":
        nodes = kept.clone()
        nodes[fgraph.logits_index] = True
        return kept, nodes
    return kept, connected_nodes(fgraph, kept)


def measure(patcher: Any, nodes: Bool[Tensor, " N"], metric: str) -> dict[str, float]:
    """Task metric and logit difference of the circuit ``nodes``, the full model and the empty circuit, and the
    recovered fractions (left out when undefined), from one :class:`FeaturePatcher` call over three masks."""
    from patching.faithfulness import FaithfulnessUndefined, faithfulness
    from patching.metrics import get_metric, logit_diff

    empty = patcher.ablatable
    masks = torch.stack([empty & ~nodes, torch.zeros_like(empty), empty])
    with torch.no_grad():
        logits = patcher.run_logits(masks).double()
    task_metric = get_metric(metric, clean_logits=logits[1])
    out: dict[str, float] = {}
    for label, fn, name in (("metric", task_metric, metric), ("logit_diff", logit_diff, "logit_diff")):
        c, full, emp = (float(v) for v in fn(logits, patcher.batch).mean(-1).tolist())
        out[f"{label}_circuit"], out[f"{label}_full"], out[f"{label}_empty"] = c, full, emp
        try:
            out["faithfulness" if label == "metric" else "logit_diff_recovered"] = faithfulness(c, full, emp,
                                                                                                 metric=name)
        except FaithfulnessUndefined:
            log.warning("discover: %s is the same with and without ablation (%.6g); left out", name, full)
    return out


def select(fgraph: Any, level: str, values: Tensor, config: DiscoveryConfig, patcher: Any
           ) -> tuple[Bool[Tensor, " U"], Bool[Tensor, " N"], dict[str, float]]:
    """The kept units and circuit nodes per ``config`` (module docstring) and selection stats."""
    from circuits.algorithms.budget import budgets
    from patching.faithfulness import mean_metric, patcher_faithfulness

    n_units = fgraph.n_nodes - 1 if level == "feature" else fgraph.n_edges
    if config.threshold is not None:
        k = int((values[:n_units].abs() >= config.threshold).sum())
        return (*node_circuit(fgraph, level, values, k), {})
    if config.topk is not None or config.topk_fraction is not None:
        k = config.topk if config.topk is not None else max(1, round(config.topk_fraction * n_units))
        return (*node_circuit(fgraph, level, values, min(k, n_units)), {})
    ks = budgets(max(1, n_units))
    cands = [node_circuit(fgraph, level, values, k) for k in ks]
    masks = torch.stack([patcher.ablatable & ~nodes for _, nodes in cands])
    with torch.no_grad():
        faith = patcher_faithfulness(patcher, mean_metric(patcher.run(masks)).cpu()).tolist()
    ok = [i for i, f in enumerate(faith) if f >= config.faithfulness_target]
    best = ok[0] if ok else max(range(len(ks)), key=lambda i: (faith[i], -i))
    return (*cands[best], {"budget": ks[best], "budget_faithfulness": faith[best],
                           "faithfulness_target": config.faithfulness_target, "budget_reached": int(bool(ok))})


def discover_features(model: Any, task: Any, method: str, bases: Mapping[str, Any],
                      config: DiscoveryConfig | None = None, *, sae_names: Mapping[str, str] | None = None,
                      max_features_per_site: int | None = 64, min_activation: float = 0.0, name: str | None = None,
                      eval_prompts: int = 0) -> nx.DiGraph:
    """Discover the feature circuit of ``model`` (a loaded bridge) on ``task`` (Task, generator name or
    ``.jsonl``) over the SAEs ``bases`` (hook -> :class:`patching.basis.Basis`, on the model's device) with
    ``method`` (module docstring); returns a CircuitGraph (:func:`circuits.convert.feature_circuit_graph`)."""
    from circuits.convert import feature_circuit_graph
    from circuits.discover import _generator_names, make_task, model_device, model_name, split_task
    from patching.features import FeatureGraph, FeaturePatcher, feature_edge_scores, feature_node_scores

    config = config or DiscoveryConfig()
    if isinstance(task, str):
        n_total = config.n_prompts + (eval_prompts if task in _generator_names() else 0)
        task = make_task(task, n_total, config.seed, model)
    metric = config.metric or task.metric
    level, m = check_feature_method(method, metric, config.ig_steps)
    config = replace(config, metric=metric, level=None)
    heldout = None
    if eval_prompts:
        task, heldout = split_task(task, eval_prompts, config.seed)
    name = name or model_name(model)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    batch = task.batch(model.tokenizer, device=model_device(model))
    fgraph = FeatureGraph.build(model, bases, batch, max_features_per_site=max_features_per_site,
                                min_activation=min_activation, sae_names=sae_names)
    log.info("discover: %s over %d sites, %d nodes, %d edges", method, len(fgraph.sites), fgraph.n_nodes,
             fgraph.n_edges)
    t_alg = time.perf_counter()
    common = dict(ablation=config.ablation, metric=metric, prompt_batch=config.prompt_batch)
    if level == "feature":
        scores = feature_node_scores(model, fgraph, batch, method=m, steps=config.ig_steps, **common)
    else:
        scores = feature_edge_scores(model, fgraph, batch, method=m, steps=config.ig_steps, **common)
    patcher = FeaturePatcher(model, fgraph, batch, chunk_size=config.chunk_size, **common)
    kept, nodes, stats = select(fgraph, level, scores.values, config, patcher)
    t_alg = time.perf_counter() - t_alg
    faith = measure(patcher, nodes, metric)
    if heldout is not None:
        hb = heldout.batch(model.tokenizer, device=model_device(model))
        held = measure(FeaturePatcher(model, fgraph, hb, chunk_size=config.chunk_size, **common), nodes, metric)
        faith.update({f"heldout_{k}": v for k, v in held.items()})
        faith.update(eval_prompts=len(hb), eval_split_seed=config.seed)
    seconds = time.perf_counter() - t0
    n_units = fgraph.n_nodes - 1 if level == "feature" else fgraph.n_edges
    attrs = {**faith, "task_metric": task.metric, "task_source": task.source or task.name, "n_prompts": len(batch),
             "units": n_units, "units_kept": int(kept.sum()), "algorithm_seconds": t_alg,
             "config": json.dumps(config.provenance(), sort_keys=True), "ranking_kind": "abs-score",
             "forward_passes": scores.forward_passes + patcher.forward_passes, "ablations": patcher.ablations,
             "seconds": seconds, **{f"stat_{k}": v for k, v in stats.items()}}
    G = feature_circuit_graph(fgraph, scores, kept, nodes, model=name, task=task.name, ablation=config.ablation,
                              metric=metric, seed=config.seed, method=method, **attrs)
    G.graph["nodes_in_circuit"] = sum(1 for _, d in G.nodes(data=True) if d.get("in_circuit"))
    return G


__all__ = ["FEATURE_METHODS", "check_feature_method", "discover_features", "connected_nodes", "node_circuit",
           "measure", "select"]
