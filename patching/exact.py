"""Exact activation patching of edges and nodes, many ablation masks per forward pass.

Edge patching (:class:`EdgePatcher`, ``patching/edge_patcher.py``) follows auto-circuit (Miller, Chughtai &
Saunders 2024): every receiver input becomes its *current* input plus, for every ablated edge into it,
``ablated_s - current_s``. Node patching (:class:`NodePatcher`) replaces the ablated units' activations (heads
at ``hook_z``, MLPs at ``hook_mlp_out``, neurons at ``mlp.hook_post``, embeddings, whole blocks) with
``torch.where`` over a ``[K, n]`` mask slice.

Both process the task in prompt batches (``prompt_batch``; ``patching/parts.py``), run ``K`` masks per
forward on ``K * b`` rows chunked to a memory budget (``max_bytes``; ``patching/memory.py``), and run each
mask from the first place it changes (``patching/suffix.py``). Interventions are ``model.hooks(...)``
context managers (hooks removed in ``finally``); runs are under ``torch.no_grad()`` and eval mode.
``forward_passes`` counts model calls (setup included), ``ablations`` counts masks evaluated. Metrics are
float32.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.batch import TaskBatch
from patching.edge_patcher import EdgePatcher
from patching.graph import ComponentGraph
from patching.kinds import unit_kind
from patching.metrics import Metric
from patching.patcher import DEFAULT_MAX_BYTES, Patcher, resolve_metric
from patching.scores import Scores, unit_ids
from patching.suffix import SuffixRunner
from patching.wiring import Hook, SenderGroup

log = logging.getLogger(__name__)


class NodePatcher(Patcher):
    """Like :class:`EdgePatcher` with masks over graph nodes (``logits`` cannot be ablated).

    Ablating a node replaces its output everywhere downstream (equivalent to ablating all its
    outgoing edges); neuron nodes replace single ``mlp.hook_post`` entries; block nodes replace a
    block's contribution ``hook_out - hook_in``.

    With ``suffix=True`` (the default) a mask is run from its first ablated layer on and the last
    block's MLP and the unembedding at the prediction positions only (``patching/suffix.py``); the
    result is the same as a whole forward (``suffix=False``) to float precision.
    """

    _level = "node"
    _what = "nodes"

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 per_position: bool = False, chunk_size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 suffix: bool = True, prompt_batch: int | None = None, mean_include_bos: bool = False):
        super().__init__(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                         per_position=per_position, chunk_size=chunk_size, max_bytes=max_bytes, replay=suffix,
                         prompt_batch=prompt_batch, mean_include_bos=mean_include_bos)
        self._n_units = graph.n_nodes
        self._logits = torch.tensor([i for i, n in enumerate(graph.nodes) if unit_kind(n.kind).is_sink], dtype=torch.long,
                                    device=self.wiring.device)
        with torch.no_grad(), self._prepared():
            for part in self.parts:
                if part.replay is not None:
                    part.runner = SuffixRunner(self, part)
        self.ablated_metric: Float[Tensor, " B"] = self.run(self.ablatable.unsqueeze(0))[0]
        self.ablations = 0

    @property
    def ablatable(self) -> Bool[Tensor, " N"]:
        """True at every node except ``logits``."""
        m = torch.ones(self.graph.n_nodes, dtype=torch.bool, device=self.wiring.device)
        m[self._logits] = False
        return m

    def _set_chunk(self, mask: Tensor, stage: int) -> None:
        if bool(mask[:, self._logits].any()):
            raise ValueError("NodePatcher.run: the logits node cannot be ablated")
        self._st.masks = [m if bool(m.any()) else None for m in (mask[:, g.node_idx] for g in self.wiring.senders)]

    def _build_hooks(self) -> list[Hook]:
        w, st = self.wiring, self._st
        hooks: list[Hook] = w.ln_hooks(st.scratch) if any(g.in_hook for g in w.senders) else []

        def node_hook(g: SenderGroup):
            def fn(x: Tensor, hook: Any) -> Tensor | None:
                m = st.masks[g.i]
                if m is None:
                    return None
                blk = st.scratch.get(g.in_hook) if g.in_hook else None
                u = g.units(x, blk)
                if u.shape[0] != st.N:
                    u = u.expand(st.N, *u.shape[1:])
                    blk = None if blk is None else blk.expand(st.N, *blk.shape[1:])
                rest = u.shape[1:]
                abl = st.part.abl_units[g.key]
                new = torch.where(m.to(u.device).view(st.K, 1, 1, g.n, 1), abl, u.view(st.K, st.B, *rest))
                return g.from_units(new.reshape(st.N, *rest), blk)
            return fn

        hooks += [(g.hook, node_hook(g)) for g in w.senders]
        return hooks


def _identity_chunks(n_units: int, columns: Tensor, size: int, device: torch.device):
    """Masks ``[c, n_units]`` with one True each, at ``columns``, ``size`` rows at a time."""
    for start in range(0, len(columns), size):
        cols = columns[start:start + size]
        m = torch.zeros(len(cols), n_units, dtype=torch.bool, device=device)
        m[torch.arange(len(cols), device=device), cols.to(device)] = True
        yield start, m


def _group(chunk_size: int | None, n_units: int) -> int:
    """Masks handed to one ``run`` call: ``chunk_size`` when given (one forward each), else a group of at most
    64 MiB of masks that the patcher chunks to its memory budget."""
    return chunk_size or max(1, min(4096, (64 << 20) // max(n_units, 1)))


def node_patching_scores(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                         metric: str | Metric = "logit_diff", level: str = "node", reference: TaskBatch | None = None,
                         per_position: bool = False, chunk_size: int | None = None, prompt_batch: int | None = None,
                         max_bytes: int = DEFAULT_MAX_BYTES, mean_include_bos: bool = False) -> Scores:
    """Exact ``m(ablated) - m(clean)`` (mean over all prompts) for every node (or neuron) ablated alone.

    ``level="node"`` scores every node (``logits`` gets 0: it cannot be ablated); ``"neuron"``
    scores only the neuron nodes (build the graph with ``neurons=True``). ``prompt_batch`` / ``max_bytes``:
    :class:`NodePatcher`.
    """
    t0 = time.perf_counter()
    ids = unit_ids(graph, level)
    if level == "edge":
        raise ValueError("node_patching_scores: level must be 'node' or 'neuron' (use edge_patching_scores)")
    if not ids:
        raise ValueError("node_patching_scores: the graph has no neurons; build it with neurons=True")
    p = NodePatcher(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                    per_position=per_position, chunk_size=chunk_size, prompt_batch=prompt_batch, max_bytes=max_bytes,
                    mean_include_bos=mean_include_bos)
    cols = torch.tensor([graph.node_index[i] for i in ids if not unit_kind(graph.node(i).kind).is_sink], dtype=torch.long)
    pos = {int(c): k for k, c in enumerate(torch.tensor([graph.node_index[i] for i in ids]).tolist())}
    values = torch.zeros(len(ids), dtype=torch.float32)
    for start, masks in _identity_chunks(graph.n_nodes, cols, _group(chunk_size, graph.n_nodes), p.wiring.device):
        delta = (p.run(masks) - p.clean_metric).mean(-1).float().cpu()
        for j, c in enumerate(cols[start:start + len(masks)].tolist()):
            values[pos[c]] = delta[j]
    return Scores(graph, level, values, ids, "patching", ablation, p.metric_name, p.forward_passes,
                  time.perf_counter() - t0)


def edge_patching_scores(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                         metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                         per_position: bool = False, chunk_size: int | None = None, prompt_batch: int | None = None,
                         max_bytes: int = DEFAULT_MAX_BYTES, qkv_path: str | None = None,
                         mean_include_bos: bool = False) -> Scores:
    """Exact ``m(ablated) - m(clean)`` (mean over all prompts) for every edge ablated alone.

    ``prompt_batch`` / ``max_bytes`` / ``qkv_path``: :class:`EdgePatcher`. A single-edge mask's sender is upstream
    of its receiver, so its difference is shared by the whole chunk and chunks are wide."""
    t0 = time.perf_counter()
    p = EdgePatcher(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                    per_position=per_position, chunk_size=chunk_size, prompt_batch=prompt_batch, max_bytes=max_bytes,
                    qkv_path=qkv_path, mean_include_bos=mean_include_bos)
    cols = torch.arange(graph.n_edges)
    values = torch.zeros(graph.n_edges, dtype=torch.float32)
    for start, masks in _identity_chunks(graph.n_edges, cols, _group(chunk_size, graph.n_edges), p.wiring.device):
        values[start:start + len(masks)] = (p.run(masks) - p.clean_metric).mean(-1).float().cpu()
    return Scores(graph, "edge", values, unit_ids(graph, "edge"), "patching", ablation, p.metric_name,
                  p.forward_passes, time.perf_counter() - t0)


__all__ = ["EdgePatcher", "NodePatcher", "node_patching_scores", "edge_patching_scores", "resolve_metric",
           "DEFAULT_MAX_BYTES"]
