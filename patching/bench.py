"""Timing benchmark of the patching engine against naive patching and plain forward passes.

For one model and one task batch of ``B`` examples, one *ablation* means the whole batch run under
one mask. Measured (wall clock, best of ``repeats``):

* ``naive_s_per_ablation``: one hooked forward per ablation (the textbook loop: a hook that writes
  the node's resampled / mean / zero activation, ``model.hooks`` around one ``model(tokens)``), over
  every head and MLP;
* ``batched_s_per_ablation``: :class:`patching.exact.NodePatcher` running the same single-node
  masks, ``chunk`` masks per forward, each from its first ablated layer on (``patching/suffix.py``);
  ``batched_whole_forward_s_per_ablation`` is the same with whole forward passes (``suffix=False``),
  to show what batching alone gives;
* ``batched_edge_s_per_ablation``: :class:`patching.exact.EdgePatcher` running random edge sets
  (each edge ablated with probability 1/2), ``chunk`` masks per forward;
* ``plain_forward_s_per_example``: an unhooked forward on the ``B`` clean prompts, divided by ``B``;
* ``eap_forward_backward_units`` / ``eap_ig_forward_backward_units``: wall time of :func:`eap` /
  :func:`eap_ig` (setup included) in units of one forward + backward (parameter gradients of the
  metric) on the ``B`` clean prompts; ``edge_scores_s`` / ``eap_ig_s`` the same wall times in seconds
  (every edge of the graph scored);
* ``peak_rss_bytes``: the process's peak resident memory at the end (model, graph and every run above);
  with a ``memory_batch`` (``--memory-n``), ``eap_ig_memory_peak_rss_bytes`` is the peak while EAP-IG runs
  on that many prompts in one prompt batch (the peak is reset first, so it counts the model as well).

``max_ablations`` times a seeded sample of the heads / MLPs instead of all of them (same sample for the
naive and the batched figure), for models where one forward per node takes minutes in all. ``chunk=None``
lets the patchers plan masks per forward to their memory budget.

Per-example ratios compare ``batched_s_per_ablation / B`` with ``plain_forward_s_per_example``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from patching.ablation import ablation_values, bos_token_id
from patching.attribution import eap, eap_ig
from patching.batch import TaskBatch
from patching.exact import EdgePatcher, NodePatcher
from patching.graph import ComponentGraph
from patching.kinds import unit_kind
from patching.memory import fmt_bytes, peak_rss_bytes, reset_peak_rss
from patching.metrics import gather_pos, get_metric
from patching.wiring import Wiring, prepared

log = logging.getLogger(__name__)

KEYS = ("naive_s_per_ablation", "batched_s_per_ablation", "batched_edge_s_per_ablation",
        "plain_forward_s_per_example", "eap_forward_backward_units", "eap_ig_forward_backward_units")
SCALE_KEYS = ("peak_rss_bytes", "n_edges", "edge_scores_s", "eap_ig_s")


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings (``chunk`` masks per batched forward; ``n_edge_masks`` random edge sets)."""

    ablation: str = "resample"
    metric: str = "logit_diff"
    chunk: int | None = 32
    n_edge_masks: int = 64
    repeats: int = 5
    ig_steps: int = 5
    seed: int = 0
    max_ablations: int | None = None
    prompt_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` round-robin rounds (after one warm-up each), so a
    burst of load from other processes spoils one sample of every figure rather than all of one."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _naive(model: Any, wiring: Wiring, batch: TaskBatch, abl: dict[str, torch.Tensor],
           nodes: set[str]) -> Callable[[], None]:
    """One hooked forward per unit in ``nodes``, each replacing that unit (in its sender group's unit form,
    ``patching/senders.py``) by its ablated value: the loop the engine replaces."""
    jobs: list[list[tuple[str, Callable[..., Any]]]] = []
    for g in wiring.senders:
        for u in range(g.n):
            if wiring.graph.nodes[int(g.node_idx[u])].id not in nodes:
                continue
            seen: dict[str, torch.Tensor] = {}

            def fn(x: torch.Tensor, hook: Any, _g: Any = g, _u: int = u, _s: dict = seen) -> torch.Tensor:
                blk = _s.get("in")
                units = _g.units(x, blk).clone()
                units[..., _u, :] = abl[_g.key][..., _u, :]
                return _g.from_units(units, blk)
            hooks = [(g.in_hook, lambda x, hook, _s=seen: _s.__setitem__("in", x))] if g.in_hook else []
            jobs.append([*hooks, (g.hook, fn)])

    def run() -> None:
        with torch.no_grad():
            for hooks in jobs:
                with model.hooks(fwd_hooks=hooks):
                    model(batch.clean)
    return run


def bench_patching(model: Any, batch: TaskBatch, config: BenchConfig = BenchConfig(),
                   memory_batch: TaskBatch | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the figures as a json-able dict."""
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    graph = ComponentGraph.from_model(model)
    B = len(batch)
    out: dict[str, Any] = {"model": graph.meta.get("model", ""), "batch_size": B, "positions": int(batch.clean.shape[1]),
                           "chunk": config.chunk, "torch_threads": torch.get_num_threads(),
                           "n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "graph_s": time.perf_counter() - t0,
                           "qkv_path": graph.meta.get("qkv_path"), "config": config.to_dict()}
    opts = dict(ablation=config.ablation, metric=config.metric, chunk_size=config.chunk,
                prompt_batch=config.prompt_batch)
    npatch = NodePatcher(model, graph, batch, **opts)
    wpatch = NodePatcher(model, graph, batch, suffix=False, **opts)
    w, b = npatch.wiring, npatch.batch
    with torch.no_grad(), prepared(model):
        abl, _ = ablation_values(w, b, npatch.clean_units, config.ablation, bos=bos_token_id(model))
    ablatable = [i for i, n in enumerate(graph.nodes) if unit_kind(n.kind).ablatable]
    if config.max_ablations is not None and config.max_ablations < len(ablatable):
        pick = torch.randperm(len(ablatable), generator=torch.Generator().manual_seed(config.seed))
        ablatable = sorted(ablatable[i] for i in pick[:config.max_ablations].tolist())
    naive = _naive(model, w, b, abl, {graph.nodes[i].id for i in ablatable})
    n_naive = len(ablatable)
    reps = max(1, -(-(config.chunk or 1) // len(ablatable)))
    cols = torch.tensor(ablatable * reps)
    masks = torch.zeros(len(cols), graph.n_nodes, dtype=torch.bool)
    masks[torch.arange(len(cols)), cols] = True

    def in_eval(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with prepared(model):
                return fn()
        return run

    fns: dict[str, Callable[[], Any]] = {
        "naive": in_eval(naive), "node": lambda: npatch.run(masks), "node_whole": lambda: wpatch.run(masks),
        "plain": in_eval(lambda: _plain_forward(model, b)),
        "unit": in_eval(lambda: _forward_backward(model, b, config.metric)),
    }
    if graph.supports_edges:
        epatch = EdgePatcher(model, graph, batch, **opts)
        g = torch.Generator().manual_seed(config.seed)
        emasks = torch.rand(config.n_edge_masks, graph.n_edges, generator=g) < 0.5
        fns["edge"] = lambda: epatch.run(emasks)
        fns["eap"] = lambda: eap(model, graph, batch, ablation=config.ablation, metric=config.metric,
                                 prompt_batch=config.prompt_batch)
        fns["eap_ig"] = lambda: eap_ig(model, graph, batch, ablation=config.ablation, metric=config.metric,
                                       steps=config.ig_steps, prompt_batch=config.prompt_batch)
    t = _timed(fns, config.repeats)
    out["naive_s_per_ablation"] = t["naive"] / n_naive
    out["batched_s_per_ablation"] = t["node"] / len(cols)
    out["batched_whole_forward_s_per_ablation"] = t["node_whole"] / len(cols)
    out["plain_forward_s_per_example"] = t["plain"] / B
    out["forward_backward_s"] = t["unit"]
    out["naive_vs_batched_speedup"] = out["naive_s_per_ablation"] / out["batched_s_per_ablation"]
    out["batched_node_vs_plain_per_example"] = out["batched_s_per_ablation"] / B / out["plain_forward_s_per_example"]
    if graph.supports_edges:
        out["batched_edge_s_per_ablation"] = t["edge"] / config.n_edge_masks
        out["batched_edge_vs_plain_per_example"] = (out["batched_edge_s_per_ablation"] / B
                                                    / out["plain_forward_s_per_example"])
        out["eap_forward_backward_units"] = t["eap"] / t["unit"]
        out["eap_ig_forward_backward_units"] = t["eap_ig"] / t["unit"]
        out["edge_scores_s"], out["eap_ig_s"] = t["eap"], t["eap_ig"]
        if memory_batch is not None:
            del epatch
            gc.collect()
            out["peak_rss_bytes"] = peak_rss_bytes()  # the peak so far: the reset below starts a new one
            reset_peak_rss()
            eap_ig(model, graph, memory_batch, ablation=config.ablation, metric=config.metric, steps=config.ig_steps)
            out["eap_ig_memory_prompts"] = len(memory_batch)
            out["eap_ig_memory_peak_rss_bytes"] = peak_rss_bytes()
    else:
        for k in ("batched_edge_s_per_ablation", "eap_forward_backward_units", "eap_ig_forward_backward_units",
                  "edge_scores_s", "eap_ig_s"):
            out[k] = None
        out["note"] = graph.meta.get("edge_reason", "")
    out["peak_rss_bytes"] = max(out.get("peak_rss_bytes", 0), peak_rss_bytes())
    return out


def _plain_forward(model: Any, batch: TaskBatch) -> None:
    with torch.no_grad():
        model(batch.clean)


def _forward_backward(model: Any, batch: TaskBatch, metric: str) -> None:
    logits = gather_pos(model(batch.clean), batch.pos)
    get_metric(metric, logits.detach())(logits, batch).mean().backward()
    model.zero_grad(set_to_none=True)


def format_table(result: dict[str, Any]) -> str:
    """The figures as an aligned two-column table."""
    rows = [(k, result.get(k)) for k in (*KEYS, "batched_whole_forward_s_per_ablation", "naive_vs_batched_speedup",
                                         "batched_node_vs_plain_per_example",
                                         "batched_edge_vs_plain_per_example", "forward_backward_s", *SCALE_KEYS,
                                         "eap_ig_memory_prompts", "eap_ig_memory_peak_rss_bytes")
            if k in result]
    width = max(len(k) for k, _ in rows)
    lines = [f"{result.get('model', '')}: batch {result.get('batch_size')} x {result.get('positions')} tokens, "
             f"chunk {result.get('chunk')}, {result.get('torch_threads')} torch threads"]
    for k, v in rows:
        lines.append(f"  {k:<{width}}  {'n/a' if v is None else fmt_bytes(v) if k.endswith('bytes') else f'{v:.4g}'}")
    return "\n".join(lines)


__all__ = ["BenchConfig", "bench_patching", "format_table", "KEYS", "SCALE_KEYS"]
