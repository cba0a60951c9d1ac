"""Exact activation patching of edges and nodes, many ablation masks per forward pass.

Edge patching follows auto-circuit (Miller, Chughtai & Saunders 2024, "Transformer Circuit
Faithfulness Metrics Are Not Robust"): in a patched forward every receiver input becomes its
*current* input plus, for every ablated edge into it, ``ablated_s - current_s`` (the sender's
ablated output minus its output in this same forward). Ablating every edge reproduces the fully
ablated run; ablating none reproduces the clean run.

``K`` masks run in one forward over a batch expanded to ``K * B`` rows (mask-major: row ``k*B + b``),
chunked to a memory budget. The hot path is vectorised: sender hooks write ``ablated - current``
into a buffer ``D [K, S, B, P, d_model]``; each receiver group (one input of one layer's receivers)
adds ``bmm(mask[:, edge_idx] [K, R, S_r], D[:, :S_r])`` to its input. Index tensors are built once
(``patching/wiring.py``); there is no Python loop over edges per forward. Node patching replaces
the ablated units' activations (heads at ``hook_z``, MLPs at ``hook_mlp_out``, neurons at
``mlp.hook_post``, embeddings, whole blocks) with ``torch.where`` over a ``[K, n]`` mask slice.

Interventions are ``model.hooks(...)`` context managers (hooks removed in ``finally``); runs are
under ``torch.no_grad()`` and eval mode. ``forward_passes`` counts model calls (setup included),
``ablations`` counts masks evaluated.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.ablation import ablation_values, check_ablation
from patching.batch import TaskBatch
from patching.graph import ComponentGraph
from patching.metrics import Metric, gather_pos, get_metric
from patching.replay import Replay
from patching.scores import Scores, unit_ids
from patching.suffix import EdgeSuffixRunner, SuffixRunner
from patching.wiring import Hook, SenderGroup, Wiring, prepared

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 29  # 512 MiB of activations per chunk


def resolve_metric(metric: str | Metric, clean_logits: Tensor) -> tuple[Metric, str]:
    """A metric callable and its name from a name in ``METRICS`` or a callable."""
    if isinstance(metric, str):
        return get_metric(metric, clean_logits=clean_logits), metric
    if not callable(metric):
        raise ValueError(f"metric must be a name or a callable, got {type(metric).__name__}")
    return metric, getattr(metric, "__name__", type(metric).__name__)


@dataclass
class _State:
    """Per-forward state the hooks read (set before each chunk)."""

    K: int = 0
    B: int = 0
    P: int = 0
    Mf: Tensor | None = None
    D: Tensor | None = None
    sender_on: list[bool] = field(default_factory=list)
    recv_on: list[bool] = field(default_factory=list)
    masks: list[Tensor | None] = field(default_factory=list)
    scratch: dict[str, Tensor] = field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.K * self.B


class _Patcher:
    """Shared setup: clean capture, ablation values, metric, chunked runs."""

    _level = "node"

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 per_position: bool = False, chunk_size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 qkv_path: str | None = None, replay: bool = False):
        check_ablation(ablation, type(self).__name__)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{type(self).__name__}: chunk_size must be >= 1, got {chunk_size}")
        self.model, self.graph, self.ablation = model, graph, ablation
        self.wiring = Wiring(model, graph, qkv_path=qkv_path)
        self.batch = batch.to(self.wiring.device)
        self.B, self.P = batch.clean.shape
        self.forward_passes = 0
        self.ablations = 0
        self._split = self._level == "edge" and self.wiring.needs_split()
        self._ungroup = self._level == "edge" and self.wiring.ungroup
        self._st = _State(B=self.B, P=self.P)
        self._replay = Replay(model, self.B) if replay else None
        self._runner: Any = None
        with torch.no_grad(), prepared(model, split_qkv=self._split, ungroup=self._ungroup):
            with self._replay.recording() if self._replay else nullcontext():
                logits, self.clean_units = self.wiring.capture(self.batch.clean)
            self.forward_passes += 1
            self.clean_logits: Float[Tensor, "B V"] = gather_pos(logits, self.batch.pos)
            if self._replay:
                self._replay.verify(self.clean_logits, self.batch.pos)
            self.metric_fn, self.metric_name = resolve_metric(metric, self.clean_logits)
            self.clean_metric: Float[Tensor, " B"] = self.metric_fn(self.clean_logits, self.batch)
            self.abl_units, runs = ablation_values(self.wiring, self.batch, self.clean_units, ablation,
                                                   reference=reference, per_position=per_position)
            self.forward_passes += runs
        self.chunk_size = chunk_size or self._auto_chunk(max_bytes)
        self._hooks = self._build_hooks()

    # ---- sizing -----------------------------------------------------------------------------
    def _auto_chunk(self, max_bytes: int) -> int:
        m = self.graph.meta
        d, H, L = m["d_model"], max(m.get("n_heads", 0), 1), m["n_layers"]
        fork = 6 * H * d if self._split else 0
        per_pos = L * (10 * d + fork + 2 * H * self.P + 3 * max(m.get("d_mlp", 0), d)) + 3 * m["d_vocab"]
        if self._level == "edge":
            per_pos += self.wiring.S * d + 3 * H * d  # sender deltas D; one receiver group's [K, R, B*P, d]
        per_mask = torch.finfo(self.wiring.dtype).bits // 8 * self.B * self.P * per_pos
        return int(max(1, max_bytes // max(per_mask, 1)))

    # ---- running ----------------------------------------------------------------------------
    def _check(self, ablate: Tensor, n: int, what: str) -> Tensor:
        if not isinstance(ablate, Tensor) or ablate.dim() != 2 or ablate.shape[1] != n:
            shape = tuple(ablate.shape) if isinstance(ablate, Tensor) else type(ablate).__name__
            raise ValueError(f"{type(self).__name__}.run: ablate must be a bool tensor [K, {n}] over {what}, "
                             f"got {shape}")
        return ablate.to(device=self.wiring.device, dtype=torch.bool)

    def _set_chunk(self, mask: Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _build_hooks(self) -> list[Hook]:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def _run_whole(self, ablate: Tensor) -> Float[Tensor, "K B V"]:
        out = []
        with prepared(self.model, split_qkv=self._split, ungroup=self._ungroup), self.model.hooks(fwd_hooks=self._hooks):
            for start in range(0, ablate.shape[0], self.chunk_size):
                chunk = ablate[start:start + self.chunk_size]
                K = chunk.shape[0]
                self._st.K = K
                self._set_chunk(chunk)
                try:
                    logits = self.model(self.batch.clean.repeat(K, 1))
                finally:
                    self._reset()
                self.forward_passes += 1
                out.append(gather_pos(logits.view(K, self.B, self.P, -1), self.batch.pos))
        self.ablations += ablate.shape[0]
        if not out:
            return torch.zeros(0, self.B, self.clean_logits.shape[-1], device=self.wiring.device)
        return torch.cat(out)

    def _reset(self) -> None:
        self._st.D, self._st.Mf, self._st.masks = None, None, []
        self._st.sender_on, self._st.recv_on = [], []
        self._st.scratch.clear()

    @torch.no_grad()
    def _run_logits(self, ablate: Tensor) -> Float[Tensor, "K B V"]:
        """Whole forwards, or with a suffix runner each mask from its first ablated place on (grouped)."""
        if self._runner is None:
            return self._run_whole(ablate)
        K = ablate.shape[0]
        start = self._runner.start(ablate)
        out = self.clean_logits.unsqueeze(0).repeat(K, 1, 1)  # masks that ablate nothing
        whole = (start < 0).nonzero()[:, 0]
        if len(whole):
            out[whole] = self._run_whole(ablate[whole])
        with prepared(self.model, split_qkv=self._split, ungroup=self._ungroup), self.model.hooks(fwd_hooks=self._hooks):
            for s in sorted(set(start.tolist()) - {-1, self._runner.none}):
                idx = (start == s).nonzero()[:, 0]
                for c in range(0, len(idx), self.chunk_size):
                    sel = idx[c:c + self.chunk_size]
                    self._st.K = len(sel)
                    self._set_chunk(ablate[sel])
                    try:
                        logits = self._runner.run(s, ablate[sel])
                    finally:
                        self._reset()
                    self.forward_passes += 1
                    out[sel] = logits.view(len(sel), self.B, -1).to(out.dtype)
        self.ablations += K - len(whole)
        return out

    def run_logits(self, ablate: Bool[Tensor, "K U"]) -> Float[Tensor, "K B V"]:
        """Next-token logits at ``pos`` for each of the ``K`` masks."""
        return self._run_logits(self._check(ablate, self._n_units, self._what))

    def run(self, ablate: Bool[Tensor, "K U"]) -> Float[Tensor, "K B"]:
        """The metric per example for each of the ``K`` masks."""
        with torch.no_grad():
            return self.metric_fn(self.run_logits(ablate), self.batch)


class EdgePatcher(_Patcher):
    """Caches clean and ablated sender outputs for one batch; then runs any number of edge masks.

    ``run(ablate [K, E])`` returns the metric per example ``[K, B]``; ``clean_metric`` /
    ``ablated_metric`` are the runs with no / every edge ablated. See the module docstring.
    """

    _level = "edge"
    _what = "edges"

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 per_position: bool = False, chunk_size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 qkv_path: str | None = None, suffix: bool = True):
        graph.require_edges("EdgePatcher")
        super().__init__(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                         per_position=per_position, chunk_size=chunk_size, max_bytes=max_bytes, qkv_path=qkv_path,
                         replay=suffix)
        self._n_units = graph.n_edges
        # ablated residual outputs of the edge senders, [n, B|1, P|1, d] per group
        self._abl_out = {s.key: s.out(self.abl_units[s.key]).permute(2, 0, 1, 3).contiguous()
                         for s in self.wiring.senders if s.s0 is not None}
        if self._replay is not None:
            self._runner = EdgeSuffixRunner(self, self._replay)
        self.ablated_metric: Float[Tensor, " B"] = self.run(torch.ones(1, graph.n_edges, dtype=torch.bool))[0]
        self.ablations = 0

    def _set_chunk(self, mask: Tensor) -> None:
        st, w = self._st, self.wiring
        active = mask.any(0)
        sender_on = torch.zeros(w.S, dtype=torch.bool, device=w.device)
        sender_on[w.edge_sender[active]] = True
        st.sender_on = [bool(sender_on[s.s0:s.s1].any()) if s.s0 is not None else False for s in w.senders]
        st.recv_on = [bool(active[r.edge_idx].any()) for r in w.receivers]
        st.Mf = mask.to(w.dtype)
        st.D = torch.zeros(st.K, w.S, self.B, self.P, w.d_model, dtype=w.dtype, device=w.device)

    def _build_hooks(self) -> list[Hook]:
        w, st, d = self.wiring, self._st, self.wiring.d_model
        hooks: list[Hook] = w.ln_hooks(st.scratch)

        def sender_hook(g: SenderGroup):
            def fn(x: Tensor, hook: Any) -> None:
                if not st.sender_on[g.i]:
                    return None
                out = g.out(g.units(x))
                if out.shape[0] != st.N:
                    out = out.expand(st.N, *out.shape[1:])
                cur = out.view(st.K, st.B, st.P, g.n, d).permute(0, 3, 1, 2, 4)
                st.D[:, g.s0:g.s1] = self._abl_out[g.key].unsqueeze(0) - cur
                return None
            return fn

        def receiver_hook(r):
            def fn(x: Tensor, hook: Any) -> Tensor | None:
                if not st.recv_on[r.i]:
                    return None
                M = st.Mf[:, r.edge_idx]                                            # [K, R, S_r]
                add = torch.bmm(M, st.D[:, :r.prefix].reshape(st.K, r.prefix, -1))  # [K, R, B*P*d]
                return r.apply(x, add.view(st.K, r.R, st.B * st.P, d),
                               st.scratch.get(r.ln_hook) if r.ln_hook else None)
            return fn

        hooks += [(g.hook, sender_hook(g)) for g in w.senders if g.s0 is not None]
        hooks += [(r.hook, receiver_hook(r)) for r in w.receivers]
        return hooks


class NodePatcher(_Patcher):
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
                 suffix: bool = True):
        super().__init__(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                         per_position=per_position, chunk_size=chunk_size, max_bytes=max_bytes, replay=suffix)
        self._n_units = graph.n_nodes
        self._logits = torch.tensor([i for i, n in enumerate(graph.nodes) if n.kind == "logits"], dtype=torch.long,
                                    device=self.wiring.device)
        if self._replay is not None:
            with torch.no_grad(), prepared(model):
                self._runner = SuffixRunner(self, self._replay)
        self.ablated_metric: Float[Tensor, " B"] = self.run(self.ablatable.unsqueeze(0))[0]
        self.ablations = 0

    @property
    def ablatable(self) -> Bool[Tensor, " N"]:
        """True at every node except ``logits``."""
        m = torch.ones(self.graph.n_nodes, dtype=torch.bool, device=self.wiring.device)
        m[self._logits] = False
        return m

    def _set_chunk(self, mask: Tensor) -> None:
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
                new = torch.where(m.view(st.K, 1, 1, g.n, 1), self.abl_units[g.key], u.view(st.K, st.B, *rest))
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


def node_patching_scores(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                         metric: str | Metric = "logit_diff", level: str = "node", reference: TaskBatch | None = None,
                         per_position: bool = False, chunk_size: int | None = None) -> Scores:
    """Exact ``m(ablated) - m(clean)`` (batch mean) for every node (or neuron) ablated alone.

    ``level="node"`` scores every node (``logits`` gets 0: it cannot be ablated); ``"neuron"``
    scores only the neuron nodes (build the graph with ``neurons=True``).
    """
    t0 = time.perf_counter()
    ids = unit_ids(graph, level)
    if level == "edge":
        raise ValueError("node_patching_scores: level must be 'node' or 'neuron' (use edge_patching_scores)")
    if not ids:
        raise ValueError("node_patching_scores: the graph has no neurons; build it with neurons=True")
    p = NodePatcher(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                    per_position=per_position, chunk_size=chunk_size)
    cols = torch.tensor([graph.node_index[i] for i in ids if graph.node(i).kind != "logits"], dtype=torch.long)
    pos = {int(c): k for k, c in enumerate(torch.tensor([graph.node_index[i] for i in ids]).tolist())}
    values = torch.zeros(len(ids), dtype=torch.float32)
    for start, masks in _identity_chunks(graph.n_nodes, cols, p.chunk_size, p.wiring.device):
        delta = (p.run(masks) - p.clean_metric).mean(-1).float().cpu()
        for j, c in enumerate(cols[start:start + len(masks)].tolist()):
            values[pos[c]] = delta[j]
    return Scores(graph, level, values, ids, "patching", ablation, p.metric_name, p.forward_passes,
                  time.perf_counter() - t0)


def edge_patching_scores(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                         metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                         per_position: bool = False, chunk_size: int | None = None) -> Scores:
    """Exact ``m(ablated) - m(clean)`` (batch mean) for every edge ablated alone."""
    t0 = time.perf_counter()
    p = EdgePatcher(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                    per_position=per_position, chunk_size=chunk_size)
    cols = torch.arange(graph.n_edges)
    values = torch.zeros(graph.n_edges, dtype=torch.float32)
    for start, masks in _identity_chunks(graph.n_edges, cols, p.chunk_size, p.wiring.device):
        values[start:start + len(masks)] = (p.run(masks) - p.clean_metric).mean(-1).float().cpu()
    return Scores(graph, "edge", values, unit_ids(graph, "edge"), "patching", ablation, p.metric_name,
                  p.forward_passes, time.perf_counter() - t0)


__all__ = ["EdgePatcher", "NodePatcher", "node_patching_scores", "edge_patching_scores", "resolve_metric",
           "DEFAULT_MAX_BYTES"]
