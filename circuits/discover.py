"""``discover(model, task, method, config) -> CircuitGraph``: one call from a model and a task to a saved-ready
circuit with its faithfulness and provenance.

Steps: tokenize the task into a :class:`patching.batch.TaskBatch`, build the model's
:class:`patching.graph.ComponentGraph`, run the registered algorithm, measure the kept circuit with the
exact engine, and convert to the ``graphs`` schema.

Faithfulness (one engine call over three masks: the circuit, nothing ablated, everything ablated)::

    f = (m(circuit) - m(empty)) / (m(full) - m(empty))

on the task's metric ``m`` (mean over prompts), where ``circuit`` ablates every unit outside the circuit,
``full`` is the unablated model and ``empty`` ablates every unit. ``logit_diff_recovered`` is the same
ratio on the logit difference. Both are left out of the graph when ``m(full) == m(empty)``.

Determinism: everything is seeded from ``config.seed`` and every algorithm is deterministic, so the same
call gives the same graph except for the ``created`` and ``seconds`` attributes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.algorithms import DiscoveryConfig, DiscoveryResult, get_algorithm, resolve_config
from circuits.algorithms.nodes import eligible_units
from circuits.convert import to_circuit_graph

log = logging.getLogger(__name__)


def model_name(model: Any) -> str:
    """A model's name for provenance (the zoo / hub name it was loaded from when known)."""
    for attr in ("circuitexplain_name", "name_or_path"):
        v = getattr(model, attr, None)
        if isinstance(v, str) and v:
            return v
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def model_device(model: Any) -> torch.device:
    cfg = getattr(model, "cfg", None)
    dev = getattr(cfg, "device", None)
    if dev is not None:
        return torch.device(dev)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def build_graph(model: Any, level: str) -> Any:
    from patching.graph import ComponentGraph

    return ComponentGraph.from_model(model, neurons=(level == "neuron"))


def discover(model: Any, task: Any, method: str, config: DiscoveryConfig | None = None, *,
             device: str | None = None, name: str | None = None) -> nx.DiGraph:
    """Discover the circuit of ``model`` on ``task`` with ``method``; returns a CircuitGraph.

    Args:
        model: a ``TransformerBridge`` or a name for :func:`circuits.models.load_model` (zoo, dir, hub).
        task: a :class:`circuits.tasks.Task`, a generator name or a ``.jsonl`` path
            (``config.n_prompts`` prompts from ``config.seed`` for generators).
        method: a key of :data:`circuits.algorithms.ALGORITHMS` (``acdc``, ``eap``, ``eap-ig``,
            ``node-patch``, ``node-atp``).
        config: the discovery settings (defaults per method filled in).
        device: where to load ``model`` when it is given by name.
        name: the model name recorded in the graph (default: the name it was loaded by).

    Raises:
        ValueError: one line naming the problem (unknown method / task / model, a level or selection the
            method does not support, an edge method on a model without edges).
    """
    config = config or DiscoveryConfig()
    algorithm = get_algorithm(method)
    if isinstance(task, str):  # bad method / task / options fail before the model is loaded
        from circuits.tasks import get_task

        task = get_task(task, n=config.n_prompts, seed=config.seed)
    config = resolve_config(algorithm, config, task.metric)
    if isinstance(model, str):
        from circuits.models import load_model

        name = name or model
        model = load_model(model, device=device)
    name = name or model_name(model)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    dev = model_device(model)
    batch = task.batch(model.tokenizer, device=dev)
    graph = build_graph(model, config.level)
    resolve_config(algorithm, config, task.metric, graph=graph)  # raises for edge methods without edges
    log.info("discover: %s on %s/%s, %d prompts, %d nodes, %d edges", method, name, task.name, len(batch),
             len(graph.nodes), len(graph.edges))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        result = algorithm(model, graph, batch, config)
    faith = measure_faithfulness(model, graph, batch, result, ablation=config.ablation, metric=task.metric,
                                 per_position=config.per_position, chunk_size=config.chunk_size)
    seconds = time.perf_counter() - t0
    n_kept = int(result.kept.sum())
    attrs = {
        **faith, "task_metric": task.metric, "task_source": task.source or task.name, "n_prompts": len(batch),
        "units": int(result.stats.get("units", len(result.scores.ids))), "units_kept": n_kept, "config": json.dumps(config.provenance(),
                                                                                    sort_keys=True),
        **{f"stat_{k}": v for k, v in sorted(result.stats.items())
           if isinstance(v, int | str) or (isinstance(v, float) and math.isfinite(v))},
    }
    result = replace(result, seconds=seconds)
    G = to_circuit_graph(graph, result, model=name, task=task.name, ablation=config.ablation,
                         metric=config.metric, seed=config.seed, **attrs)
    G.graph["nodes_in_circuit"] = sum(1 for _, d in G.nodes(data=True) if d.get("in_circuit"))
    return G


def _ablate_masks(graph: Any, result: DiscoveryResult) -> tuple[Bool[Tensor, "3 U"], str]:
    """Masks ``[circuit, full, empty]`` over the engine's units and the patcher kind to use."""
    if result.level == "edge":
        n = len(graph.edges)
        ids = tuple(e.id for e in graph.edges)
        kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
        in_circuit = torch.tensor([kept[i] for i in ids], dtype=torch.bool)
        return torch.stack([~in_circuit, torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]), "edge"
    ids = tuple(n.id for n in graph.nodes)
    ok = eligible_units(graph, ids)
    if result.level == "neuron":
        ok &= torch.tensor([n.kind == "neuron" for n in graph.nodes], dtype=torch.bool)
    kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
    in_circuit = torch.tensor([kept.get(i, False) for i in ids], dtype=torch.bool)
    return torch.stack([ok & ~in_circuit, torch.zeros_like(ok), ok]), "node"


def measure_faithfulness(model: Any, graph: Any, batch: Any, result: DiscoveryResult, *, ablation: str,
                         metric: str, per_position: bool = False, chunk_size: int | None = None) -> dict[str, float]:
    """Task metric and logit difference of the circuit, the full model and the empty circuit, and the
    recovered fractions ``faithfulness`` and ``logit_diff_recovered`` (see the module docstring)."""
    from patching.metrics import get_metric, logit_diff

    masks, kind = _ablate_masks(graph, result)
    if kind == "edge":
        from patching.exact import EdgePatcher

        patcher = EdgePatcher(model, graph, batch, ablation=ablation, metric="logit_diff",
                              per_position=per_position, chunk_size=chunk_size)
    else:
        from patching.exact import NodePatcher

        patcher = NodePatcher(model, graph, batch, ablation=ablation, metric="logit_diff",
                              per_position=per_position, chunk_size=chunk_size)
    dev = masks.device
    clean_dev = getattr(patcher, "clean_metric", None)
    if isinstance(clean_dev, Tensor):
        dev = clean_dev.device
    with torch.no_grad():
        logits = patcher.run_logits(masks.to(dev)).double()  # [3, B, V]
    task_metric = get_metric(metric, clean_logits=logits[1])
    out: dict[str, float] = {}
    for label, fn in (("metric", task_metric), ("logit_diff", logit_diff)):
        c, full, empty = (float(v) for v in fn(logits, batch).mean(-1).tolist())
        out[f"{label}_circuit"], out[f"{label}_full"], out[f"{label}_empty"] = c, full, empty
        den = full - empty
        key = "faithfulness" if label == "metric" else "logit_diff_recovered"
        if abs(den) > 1e-12 * max(1.0, abs(full)):
            out[key] = (c - empty) / den
    out["faithfulness_forward_passes"] = int(getattr(patcher, "forward_passes", 0))
    return out
