"""``discover(model, task, method, config) -> CircuitGraph``: one call from a model and a task to a saved-ready
circuit with its faithfulness and provenance.

Steps: decide whether the request makes sense before any weights load (method, level, selection, metric,
the metric's gradient for attribution methods, and edge support from the model's architecture facts,
:func:`circuits.models.model_facts`); tokenize the task into a :class:`patching.batch.TaskBatch`, build the
model's :class:`patching.graph.ComponentGraph`, run the registered algorithm, measure the kept circuit with
the exact engine, and convert to the ``graphs`` schema.

Faithfulness (one engine call over three masks: the circuit, nothing ablated, everything ablated;
:mod:`patching.faithfulness`)::

    f = (m(circuit) - m(empty)) / (m(full) - m(empty))

on the task's metric ``m`` (mean over prompts), where ``circuit`` ablates every unit outside the circuit,
``full`` is the unablated model and ``empty`` ablates everything, the embeddings included.
``logit_diff_recovered`` is the same ratio on the logit difference. Both are left out of the graph when
``m(full) == m(empty)``.

Held-out prompts (``eval_prompts=N``): the circuit is found on one set of prompts and measured again on N
others it never saw (``heldout_faithfulness``, ``heldout_logit_diff_recovered``): a generator task makes
``n_prompts + N`` prompts from ``config.seed`` and holds out N of them; a task from a file or a Task object
holds out N of its pairs. The split (:func:`split_task`) is seeded and keeps identical clean prompts on one
side, so the two sets are disjoint.

Determinism: everything is seeded from ``config.seed`` and every algorithm is deterministic, so the same
call gives the same graph except for the ``created`` and ``seconds`` attributes.
"""

from __future__ import annotations

import json
import logging
import math
import random
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

SPLIT_SALT = 0x5EED5  # the split's random stream differs from the task generator's for the same seed


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


def split_task(task: Any, n_heldout: int, seed: int) -> tuple[Any, Any]:
    """``(train, heldout)``: ``n_heldout`` pairs (at least; pairs with the same clean prompt stay together)
    drawn with ``random.Random(seed ^ SPLIT_SALT)`` into ``heldout``, the rest in ``train``, both in the task's
    order. Raises a one-line ``ValueError`` when either side would be empty."""
    n = len(task.pairs)
    if not 0 < n_heldout < n:
        raise ValueError(f"task {task.name!r}: cannot hold out {n_heldout} of its {n} prompt pairs "
                         f"(need 0 < held out < {n})")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(task.pairs):
        groups.setdefault(p.clean, []).append(i)
    order = list(groups.values())
    random.Random(seed ^ SPLIT_SALT).shuffle(order)
    held: list[int] = []
    for g in order:
        if len(held) >= n_heldout:
            break
        held += g
    if len(held) >= n:
        raise ValueError(f"task {task.name!r}: every prompt pair shares its clean prompt; nothing left to "
                         f"discover on after holding out {n_heldout}")
    hs = set(held)

    def subset(idx: list[int], label: str) -> Any:
        srcs = getattr(task, "sources", ()) or ()
        return replace(task, pairs=tuple(task.pairs[i] for i in idx),
                       sources=tuple(srcs[i] for i in idx) if len(srcs) == n else srcs,
                       source=f"{task.source or task.name} [{label} {len(idx)} of {n}, split seed {seed}]")

    return subset([i for i in range(n) if i not in hs], "train"), subset(sorted(hs), "held out")


def make_task(task: str, n: int, seed: int, model: Any = None) -> Any:
    """A task from a generator name or a ``.jsonl`` path, written for (and validated against) the model's
    tokenizer: a bridge's own, or for a model name its tokenizer alone (no weights)."""
    from circuits.tasks import get_task

    tokenizer = None
    if model is not None:
        from circuits.models import load_tokenizer

        tokenizer = load_tokenizer(model) if isinstance(model, str) else model.tokenizer
    return get_task(task, n=n, seed=seed, tokenizer=tokenizer)


def discover(model: Any, task: Any, method: str, config: DiscoveryConfig | None = None, *,
             device: str | None = None, name: str | None = None, dtype: str | None = None,
             eval_prompts: int = 0) -> nx.DiGraph:
    """Discover the circuit of ``model`` on ``task`` with ``method``; returns a CircuitGraph.

    Args:
        model: a ``TransformerBridge`` or a name for :func:`circuits.models.load_model` (zoo, pretrained,
            dir, hub).
        task: a :class:`circuits.tasks.Task`, a generator name or a ``.jsonl`` path
            (``config.n_prompts`` prompts from ``config.seed`` for generators).
        method: a key of :data:`circuits.algorithms.ALGORITHMS` (``acdc``, ``eap``, ``eap-ig``, ``greedy``,
            ``node-patch``, ``node-atp``).
        config: the discovery settings (defaults per method filled in).
        device: where to load ``model`` when it is given by name.
        name: the model name recorded in the graph (default: the name it was loaded by).
        dtype: ``float32`` / ``bfloat16`` / ``float16`` for a model given by name (engine sums stay float32).
        eval_prompts: hold out this many prompts and measure the circuit on them too (module docstring).

    Raises:
        ValueError: one line naming the problem (unknown method / task / model, a level, selection, warm
            start or metric the method does not support, an edge method on a model without edges), raised
            before any weights load whenever the arguments and the model's config decide it.
    """
    config = config or DiscoveryConfig()
    algorithm = get_algorithm(method)
    if eval_prompts < 0:
        raise ValueError(f"eval_prompts must be >= 0, got {eval_prompts}")
    facts = None
    if isinstance(model, str):
        from circuits.models import model_facts

        facts = model_facts(model)  # the config only: no weights yet
    if isinstance(task, str):
        task_name = task
        n_total = config.n_prompts + (eval_prompts if task_name in _generator_names() else 0)
        task = make_task(task_name, n_total, config.seed, model)
    config = resolve_config(algorithm, config, task.metric, facts=facts)
    heldout = None
    if eval_prompts:
        task, heldout = split_task(task, eval_prompts, config.seed)
    if isinstance(model, str):
        from circuits.models import load_model

        name = name or model
        model = load_model(model, device=device, dtype=dtype)
    name = name or model_name(model)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    dev = model_device(model)
    batch = task.batch(model.tokenizer, device=dev)
    graph = build_graph(model, config.level)
    resolve_config(algorithm, config, task.metric, graph=graph)  # raises for edge methods without edges
    log.info("discover: %s on %s/%s, %d prompts, %d nodes, %d edges", method, name, task.name, len(batch),
             len(graph.nodes), len(graph.edges))
    t_alg = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        result = algorithm(model, graph, batch, config)
    t_alg = time.perf_counter() - t_alg
    measure = dict(ablation=config.ablation, metric=task.metric, per_position=config.per_position,
                   chunk_size=config.chunk_size, prompt_batch=config.prompt_batch)
    faith = measure_faithfulness(model, graph, batch, result, **measure)
    seconds = time.perf_counter() - t0
    if heldout is not None:
        hb = heldout.batch(model.tokenizer, device=dev)
        held = measure_faithfulness(model, graph, hb, result, **measure)
        faith.update({f"heldout_{k}": v for k, v in held.items() if k != "faithfulness_forward_passes"})
        faith.update(eval_prompts=len(hb), eval_split_seed=config.seed)
    n_kept = int(result.kept.sum())
    attrs = {
        **faith, "task_metric": task.metric, "task_source": task.source or task.name, "n_prompts": len(batch),
        "units": int(result.stats.get("units", len(result.scores.ids))), "units_kept": n_kept,
        "config": json.dumps(config.provenance(), sort_keys=True), "ranking_kind": result.ranking_kind,
        "algorithm_seconds": t_alg,
        **({"dtype": str(dtype)} if dtype else {}),
        **{f"stat_{k}": v for k, v in sorted(result.stats.items())
           if isinstance(v, int | str) or (isinstance(v, float) and math.isfinite(v))},
    }
    result = replace(result, seconds=seconds)
    G = to_circuit_graph(graph, result, model=name, task=task.name, ablation=config.ablation,
                         metric=config.metric, seed=config.seed, **attrs)
    G.graph["nodes_in_circuit"] = sum(1 for _, d in G.nodes(data=True) if d.get("in_circuit"))
    return G


def _generator_names() -> set[str]:
    from circuits.tasks import TASKS

    return set(TASKS)


def circuit_mask(graph: Any, result: DiscoveryResult) -> Bool[Tensor, " U"]:
    """The engine's ablation mask of ``result``'s circuit: every unit outside it (edges at edge level; heads,
    MLPs or neurons at node / neuron level; the embeddings and the logits are never ablated)."""
    kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
    if result.level == "edge":
        return torch.tensor([not kept[e.id] for e in graph.edges], dtype=torch.bool)
    ids = tuple(n.id for n in graph.nodes)
    ok = eligible_units(graph, ids)
    if result.level == "neuron":
        ok &= torch.tensor([n.kind == "neuron" for n in graph.nodes], dtype=torch.bool)
    in_circuit = torch.tensor([kept.get(i, False) for i in ids], dtype=torch.bool)
    return ok & ~in_circuit


def measure_faithfulness(model: Any, graph: Any, batch: Any, result: DiscoveryResult, *, ablation: str,
                         metric: str, per_position: bool = False, chunk_size: int | None = None,
                         prompt_batch: int | None = None) -> dict[str, float]:
    """Task metric and logit difference of the circuit, the full model and the empty circuit, and the
    recovered fractions ``faithfulness`` and ``logit_diff_recovered`` (:mod:`patching.faithfulness`: the
    empty circuit ablates everything, the embeddings included). A fraction whose denominator vanishes is left
    out. ``prompt_batch``: prompts per engine forward (memory; ``None``: all)."""
    from circuits.algorithms.engine import engine_kwargs
    from patching.exact import EdgePatcher, NodePatcher
    from patching.faithfulness import FaithfulnessUndefined, empty_mask, faithfulness
    from patching.metrics import get_metric, logit_diff

    cls = EdgePatcher if result.level == "edge" else NodePatcher
    patcher = cls(model, graph, batch, ablation=ablation, metric="logit_diff", per_position=per_position,
                  chunk_size=chunk_size, **engine_kwargs(cls, cls.__name__, prompt_batch=prompt_batch))
    empty = empty_mask(patcher)
    masks = torch.stack([circuit_mask(graph, result).to(empty.device), torch.zeros_like(empty), empty])
    with torch.no_grad():
        logits = patcher.run_logits(masks).double()  # [3, B, V]
    task_metric = get_metric(metric, clean_logits=logits[1])
    out: dict[str, float] = {}
    for label, fn, name in (("metric", task_metric, metric), ("logit_diff", logit_diff, "logit_diff")):
        c, full, emp = (float(v) for v in fn(logits, patcher.batch).mean(-1).tolist())
        out[f"{label}_circuit"], out[f"{label}_full"], out[f"{label}_empty"] = c, full, emp
        key = "faithfulness" if label == "metric" else "logit_diff_recovered"
        try:
            out[key] = faithfulness(c, full, emp, metric=name)
        except FaithfulnessUndefined:
            log.warning("discover: %s is the same with and without ablation (%.6g); %s left out", name, full, key)
    out["faithfulness_forward_passes"] = int(getattr(patcher, "forward_passes", 0))
    return out
