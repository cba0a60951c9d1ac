"""What the edge and node patchers share: setup per prompt batch, memory-planned chunks of masks, the run loop.

A patcher (:class:`patching.exact.EdgePatcher`, :class:`patching.exact.NodePatcher`) splits its task into
prompt batches (:mod:`patching.parts`). For each it runs the clean forward once (recording it for the suffix
runners), computes the ablated activations of every sender (:class:`patching.ablation.Ablator`: a mean is
over all prompts of the task), and keeps both. ``run(masks [K, U])`` then runs the masks on every prompt
batch, grouped by the first place they change (:mod:`patching.suffix`) and chunked so that one forward
stays within ``max_bytes`` (:mod:`patching.memory`), and returns the metric per prompt ``[K, B]``.

Sizing: ``prompt_batch=None`` picks the largest prompt batch for which the worst single mask (every
sender's difference, a whole forward) fits ``max_bytes``; an explicit ``prompt_batch`` is taken as given,
and a mask that alone exceeds the budget is a one-line ``ValueError`` naming the budget. An explicit
``chunk_size`` fixes the number of masks per forward (no budget check), as before.

Metrics and KL are computed in float32 from the logits at the prediction position, whatever the model's
dtype.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.ablation import Ablator, bos_token_id, check_ablation, trimmed
from patching.batch import TaskBatch
from patching.graph import ComponentGraph
from patching.memory import MemoryModel, fmt_bytes
from patching.metrics import Metric, gather_pos, get_metric
from patching.parts import Part, check_prompt_batch, prompt_slices
from patching.replay import Replay
from patching.wiring import Hook, Wiring, forward_logits, prepared

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 29  # 512 MiB of working memory per batched forward


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
    part: Part | None = None
    pos: Tensor | None = None
    masks: list[Tensor | None] = field(default_factory=list)
    scratch: dict[str, Tensor] = field(default_factory=dict)
    edge: Any = None  # the edge patcher's chunk (patching.edge_patcher._Chunk)

    @property
    def N(self) -> int:
        return self.K * self.B


class Patcher:
    """Shared setup and run loop (module docstring). Subclasses set ``_level``, ``_what`` and implement
    ``_set_chunk``, ``_build_hooks``, ``_make_runner`` and ``_plan_masks``."""

    _level = "node"
    _what = "nodes"

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 per_position: bool = False, chunk_size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 qkv_path: str | None = None, replay: bool = False, prompt_batch: int | None = None,
                 mean_include_bos: bool = False):
        name = type(self).__name__
        check_ablation(ablation, name)
        check_prompt_batch(prompt_batch, name)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
        if max_bytes < 1:
            raise ValueError(f"{name}: max_bytes must be >= 1, got {max_bytes}")
        self.model, self.graph, self.ablation = model, graph, ablation
        self.wiring = Wiring(model, graph, qkv_path=qkv_path)
        self.batch = batch.to(self.wiring.device)
        self.B, self.P = batch.clean.shape
        self.max_bytes = int(max_bytes)
        self.forward_passes = 0
        self.ablations = 0
        self._split = self._level == "edge" and self.wiring.needs_split()
        self._ungroup = self._level == "edge" and self.wiring.ungroup
        self.memory = MemoryModel.from_graph(graph, self.wiring.dtype, edges=self._level == "edge", split=self._split)
        if prompt_batch is None:
            prompt_batch = self.memory.prompt_batch(self.B, self.P, self.max_bytes) if chunk_size is None else self.B
            if prompt_batch < 1:
                raise ValueError(f"{name}: one mask over a single prompt of {self.P} tokens may need "
                                 f"{fmt_bytes(self.memory.worst_mask(1, self.P))}, over the memory budget "
                                 f"max_bytes={fmt_bytes(self.max_bytes)}; raise max_bytes")
        self.prompt_batch = min(prompt_batch, max(self.B, 1))
        self._st = _State()
        ablator = Ablator(self.wiring, ablation, reference=reference, per_position=per_position,
                          bos=bos_token_id(model), include_bos=mean_include_bos, prompt_batch=self.prompt_batch)
        self.parts: list[Part] = []
        with torch.no_grad(), self._prepared():
            for rows in prompt_slices(self.B, self.prompt_batch):
                sub = trimmed(self.batch[rows])
                rp = Replay(model, len(sub)) if replay else None
                units: dict[str, Tensor] = {}
                points: dict[Any, Tensor] = {}
                with rp.recording() if rp is not None else nullcontext():
                    hooks = self.wiring.capture_hooks(units, {}) + self._clean_hooks(points)
                    logits = forward_logits(model, graph.meta, sub.clean, hooks, pos=sub.pos)
                self.forward_passes += 1
                part = Part(rows, sub, logits, units, replay=rp, points=points)
                if rp is not None and not self.parts:
                    rp.verify(part.clean_logits, sub.pos)
                elif rp is not None:  # the same calls on other prompts: the first batch's verdict holds
                    rp.adopt(self.parts[0].replay)
                part.metric_fn, self.metric_name = resolve_metric(metric, part.clean_logits.float())
                part.clean_metric = part.metric_fn(part.clean_logits.float(), sub).float()
                self.parts.append(part)
            self.forward_passes += ablator.fit([(p.batch, p.clean_units) for p in self.parts])
            for part in self.parts:
                part.abl_units, runs = ablator.values(part.batch, part.clean_units)
                self.forward_passes += runs
        self.clean_logits: Float[Tensor, "B V"] = torch.cat([p.clean_logits for p in self.parts])
        self.clean_metric: Float[Tensor, " B"] = torch.cat([p.clean_metric for p in self.parts])
        self._explicit_chunk = chunk_size is not None
        self.chunk_size = chunk_size or self._default_chunk()
        self._hooks = self._build_hooks()

    # ---- per-part views (the first prompt batch; kept for callers of the one-batch engine) ---------------
    @property
    def clean_units(self) -> dict[str, Tensor]:
        return self.parts[0].clean_units

    @property
    def abl_units(self) -> dict[str, Tensor]:
        return self.parts[0].abl_units

    @property
    def _replay(self) -> Replay | None:
        return self.parts[0].replay

    @property
    def _runner(self) -> Any:
        return self.parts[0].runner

    def _prepared(self):
        return prepared(self.model, split_qkv=self._split, ungroup=self._ungroup)

    # ---- sizing -----------------------------------------------------------------------------------
    def _default_chunk(self) -> int:
        """Masks per forward for the worst (dense, first-layer) masks of the first prompt batch."""
        p = self.parts[0]
        return max(1, self.max_bytes // max(self._chunk_bytes(1, len(self.graph.senders), 0, p.B, p.P, False), 1))

    def _chunk_bytes(self, K: Any, A: Any, U: Any, b: int, P: int, whole: bool) -> Any:
        if self._level == "edge":
            return self.memory.edge_chunk(K, A, U, b, P, whole=whole)
        return self.memory.node_chunk(K, b, P, whole=whole)

    def _plan(self, masks: Tensor, stage: int) -> list[Tensor]:
        """Index tensors splitting ``masks`` (all starting at ``stage``; -1: whole forwards) into chunks that fit
        ``max_bytes`` (or of ``chunk_size`` when it was given)."""
        K = masks.shape[0]
        if self._explicit_chunk:
            return [torch.arange(i, min(i + self.chunk_size, K)) for i in range(0, K, self.chunk_size)]
        part, whole = self._st.part, stage < 0
        live, up = self._plan_masks(masks, stage)   # [K, S] cumulative-free usage flags (edges) or None
        out: list[Tensor] = []
        i, window = 0, 64
        while i < K:
            j = min(K, i + window)
            k = torch.arange(1, j - i + 1, dtype=torch.long)
            if live is None:
                A = U = torch.zeros_like(k)
            else:
                A = live[i:j].to(torch.uint8).cummax(0).values.sum(1).cpu().long()
                U = up[i:j].to(torch.uint8).cummax(0).values.sum(1).cpu().long()
            need = self._chunk_bytes(k, A, U, part.B, part.P, whole)
            n = int((need <= self.max_bytes).sum())  # need grows with the chunk: the fitting chunks are a prefix
            if n == 0:
                raise ValueError(
                    f"{type(self).__name__}: one mask over {part.B} prompts of {part.P} tokens needs about "
                    f"{fmt_bytes(int(need[0]))} ({int(A[0]) + int(U[0])} sender differences and one forward), over "
                    f"the memory budget max_bytes={fmt_bytes(self.max_bytes)}; use a smaller prompt_batch "
                    f"(None sizes it to the budget) or a larger max_bytes")
            if n == j - i and j < K:
                window *= 2
                continue
            out.append(torch.arange(i, i + n))
            i += n
        return out

    def _plan_masks(self, masks: Tensor, stage: int) -> tuple[Tensor | None, Tensor | None]:
        return None, None

    # ---- running ----------------------------------------------------------------------------------
    def _check(self, ablate: Tensor, n: int, what: str) -> Tensor:
        if not isinstance(ablate, Tensor) or ablate.dim() != 2 or ablate.shape[1] != n:
            shape = tuple(ablate.shape) if isinstance(ablate, Tensor) else type(ablate).__name__
            raise ValueError(f"{type(self).__name__}.run: ablate must be a bool tensor [K, {n}] over {what}, "
                             f"got {shape}")
        return ablate.to(device=self.wiring.device, dtype=torch.bool)

    def _clean_hooks(self, points: dict[Any, Tensor]) -> list[Hook]:
        """Extra hooks on each prompt batch's clean forward, storing what a subclass needs in ``points``
        (kept as ``Part.points``)."""
        return []

    def _set_chunk(self, mask: Tensor, stage: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _build_hooks(self) -> list[Hook]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _reset(self) -> None:
        st = self._st
        st.masks, st.edge = [], None
        st.scratch.clear()

    def _use(self, part: Part) -> None:
        st = self._st
        st.part, st.B, st.P, st.pos = part, part.B, part.P, part.batch.pos

    def _whole(self, part: Part, K: int) -> Tensor:
        logits = self.model(part.batch.clean.repeat(K, 1))
        return gather_pos(logits.view(K, part.B, part.P, -1), part.batch.pos).reshape(K * part.B, -1)

    def _run_part(self, part: Part, ablate: Tensor) -> Float[Tensor, "K b V"]:
        self._use(part)
        K = ablate.shape[0]
        base = part.cache.get("base")  # (ablate [U], logits [b, V], ...): EdgePatcher.based_on
        ref = part.clean_logits if base is None else base[1]
        out = ref.float().unsqueeze(0).repeat(K, 1, 1)  # masks that ablate nothing (or exactly the base)
        if part.runner is not None:
            start = part.runner.start(ablate)
            none = part.runner.none
        else:
            differs = ablate.any(1) if base is None else (ablate != base[0].to(ablate.device)).any(1)
            start = torch.where(differs, -1, 0)
            none = 0
        for s in sorted(set(start.tolist()) - {none}):
            idx = (start == s).nonzero()[:, 0]
            for sel in self._plan(ablate[idx], s):
                rows = idx[sel.to(idx.device)]
                chunk = ablate[rows]
                self._st.K = len(rows)
                self._set_chunk(chunk, s)
                try:
                    logits = self._whole(part, len(rows)) if s < 0 else part.runner.run(s, chunk)
                finally:
                    self._reset()
                self.forward_passes += 1
                out[rows] = logits.view(len(rows), part.B, -1).float()
        return out

    @torch.no_grad()
    def _run_logits(self, ablate: Tensor) -> Float[Tensor, "K B V"]:
        K = ablate.shape[0]
        out = torch.empty(K, self.B, self.clean_logits.shape[-1], dtype=torch.float32, device=self.wiring.device)
        with self._prepared(), self.model.hooks(fwd_hooks=self._hooks):
            for part in self.parts:
                out[:, part.rows] = self._run_part(part, ablate).to(out.device)
        self._st.part = None
        self.ablations += K
        return out

    def run_logits(self, ablate: Bool[Tensor, "K U"]) -> Float[Tensor, "K B V"]:
        """Next-token logits at ``pos`` (float32) for each of the ``K`` masks, every prompt batch."""
        return self._run_logits(self._check(ablate, self._n_units, self._what))

    @torch.no_grad()
    def run(self, ablate: Bool[Tensor, "K U"]) -> Float[Tensor, "K B"]:
        """The metric per prompt (float32) for each of the ``K`` masks."""
        logits = self.run_logits(ablate)
        out = torch.empty(logits.shape[0], self.B, dtype=torch.float32, device=logits.device)
        for part in self.parts:
            out[:, part.rows] = part.metric_fn(logits[:, part.rows], part.batch).float().to(out.device)
        return out


__all__ = ["Patcher", "resolve_metric", "DEFAULT_MAX_BYTES"]
