"""Exact edge patching, many masks per forward pass (auto-circuit's trick), with sender differences held sparsely.

Edge semantics (Miller, Chughtai & Saunders 2024, "Transformer Circuit Faithfulness Metrics Are Not Robust"):
in a patched forward every receiver input becomes its *current* input plus, for every ablated edge into it,
``ablated_s - current_s`` (the sender's ablated output minus its output in this same forward). Ablating
every edge reproduces the fully ablated run; ablating none the clean run.

``K`` masks run as one forward on ``K * b`` rows (mask-major). For a chunk whose first receiver stage is
``s`` (:class:`patching.suffix.EdgeSuffixRunner`; ``-1``: whole forwards) the senders split in two:

* *upstream* senders, which are not re-run in this chunk (and the embeddings, which nothing changes): their
  current output is the clean one, so their difference ``Dc [U, b*P*d]`` is the same for every mask and is
  computed once per chunk, for the ``U`` upstream senders some mask of the chunk uses;
* *re-run* senders: their current output depends on the mask, so their sender hooks write
  ``D [K, A, b*P*d]``, for the ``A`` re-run senders some mask uses (columns in sender order), and only those
  units' outputs are computed.

Each receiver group (one input of one layer's receivers) adds ``bmm(mask[:, edge(r, live)], D[:, :A_r]) +
mask[:, edge(r, up)] @ Dc[:U_r]`` to its input; the senders a receiver reads are a prefix of the sender
order, so ``A_r`` / ``U_r`` are prefixes of the column lists. Where the last MLP and the unembedding run at
the prediction positions only, the hooks take the differences at those positions. Nothing loops over edges.

Sparse circuits (the complement form). A circuit keeps few edges: a mask over a 120-thousand-edge graph that
keeps 2,000 ablates 118,000, and the sum above runs over every sender. Because the residual stream is the sum
of its senders' writes (plus constants), the same input is also ``R_r - sum_{kept e} (ablated_s - current_s)``,
where ``R_r`` is the receiver's input with every edge into it ablated, computed once per prompt batch from the
clean residual stream at the receiver (captured on the clean forward) and the clean sender differences
(``R_r = clean_r + sum_{s < prefix_r} (ablated_s - clean_s)``). Per chunk and receiver group the engine takes
the form with fewer senders to read (``_Chunk.comp``), and each group multiplies only the columns its edges
use. The identity holds for a residual-stream architecture; it is checked on every receiver group during the
all-ablated run at setup (where both forms must give the same input), and a group where it does not hold, or a
model in half precision (where ``R_r - x`` would cancel in 8-bit mantissas), keeps the direct form.

Multi-GPU (``n_devices`` / ``device_map``; not exercised on the CPU-only test machines): each receiver hook
reads buffers on its own layer's device: the masks, ``D`` and ``Dc`` exist once per device that hosts an
active receiver, each holding the column prefix its receivers read; a sender hook copies its difference to
every such buffer (the minimal traffic: the numbers must reach the reading layer). With one device there is
one buffer of each.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.batch import TaskBatch
from patching.graph import ComponentGraph
from patching.metrics import Metric
from patching.patcher import DEFAULT_MAX_BYTES, Patcher
from patching.replay import Replay
from patching.suffix import EdgeSuffixRunner
from patching.wiring import Hook, ReceiverGroup, SenderGroup

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    """The sender differences and masks of one chunk, per device (module docstring)."""

    Mf: dict[torch.device, Tensor] = field(default_factory=dict)        # [K, E] masks in the model dtype
    live: dict[torch.device, Tensor] = field(default_factory=dict)      # re-run used senders (sender order)
    up: dict[torch.device, Tensor] = field(default_factory=dict)        # upstream used senders
    D: dict[torch.device, Tensor] = field(default_factory=dict)         # [K, A_dev, b*P*d]
    Dc: dict[torch.device, Tensor] = field(default_factory=dict)        # [U_dev, b*P*d]
    cut_live: list[int] = field(default_factory=list)                   # per receiver group: A_r
    cut_up: list[int] = field(default_factory=list)                     # per receiver group: U_r
    recv_on: list[bool] = field(default_factory=list)
    sel: list[Any] = field(default_factory=list)  # per sender group: (units, columns c0, c1) or None
    comp: list[Any] = field(default_factory=list)  # per receiver group: [K] bool, masks in the complement form
    cols_live: list[Any] = field(default_factory=list)  # per receiver group: columns of D it reads (None: prefix)
    cols_up: list[Any] = field(default_factory=list)    # per receiver group: rows of Dc it reads (None: prefix)
    verify: bool = False                                # setup's all-ablated run: check the complement identity


def _at_pos(t: Tensor, b: int, P: int, pos: Tensor) -> Tensor:
    """``[..., b*P*d]`` -> ``[..., b*d]`` at each prompt's prediction position."""
    lead = t.shape[:-1]
    v = t.reshape(*lead, b, P, -1)
    idx = pos.to(t.device).view(*([1] * len(lead)), b, 1, 1).expand(*lead, b, 1, v.shape[-1])
    return v.gather(-2, idx).reshape(*lead, -1)


class EdgePatcher(Patcher):
    """Caches clean and ablated sender outputs for each prompt batch; then runs any number of edge masks.

    ``run(ablate [K, E])`` returns the metric per prompt ``[K, B]``; ``clean_metric`` / ``ablated_metric``
    are the runs with no / every edge ablated. ``prompt_batch``, ``max_bytes`` and ``chunk_size``: see
    :mod:`patching.patcher`; ``mean_include_bos``: :mod:`patching.ablation`; ``complement=False`` keeps the
    direct form for every receiver (the complement form gives the same numbers to float rounding, faster on
    sparse circuits). See the module docstring.
    """

    _level = "edge"
    _what = "edges"

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 per_position: bool = False, chunk_size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 qkv_path: str | None = None, suffix: bool = True, prompt_batch: int | None = None,
                 mean_include_bos: bool = False, complement: bool = True):
        graph.require_edges("EdgePatcher")
        self._complement = bool(complement)
        super().__init__(model, graph, batch, ablation=ablation, metric=metric, reference=reference,
                         per_position=per_position, chunk_size=chunk_size, max_bytes=max_bytes, qkv_path=qkv_path,
                         replay=suffix, prompt_batch=prompt_batch, mean_include_bos=mean_include_bos)
        self._n_units = graph.n_edges
        w = self.wiring
        # each sender's stage (2L: heads of layer L, 2L + 1: its MLP; -2: embeddings, never re-run)
        stage = torch.full((w.S,), -2, dtype=torch.long, device=w.device)
        for g in w.senders:
            if g.s0 is not None and g.layer is not None:
                stage[g.s0:g.s1] = 2 * g.layer + g.stage  # its unit kind's stage (patching/kinds.py)
        self._sender_stage = stage
        for part in self.parts:
            if part.replay is not None:
                part.runner = EdgeSuffixRunner(self, part)
        # complement form (module docstring): verified per receiver group on the all-ablated run below
        self._comp_ok: list[bool | None] = [None if self._comp_dtype() else False] * len(w.receivers)
        self._verifying = True
        try:
            self.ablated_metric: Float[Tensor, " B"] = self.run(torch.ones(1, graph.n_edges, dtype=torch.bool))[0]
        finally:
            self._verifying = False
        self._comp_ok = [bool(ok) for ok in self._comp_ok]
        for part in self.parts:
            part.points.clear()
            if not any(self._comp_ok):
                part.cache.pop("full", None)
        self.ablations = 0

    # ---- a base mask ----------------------------------------------------------------------------------
    @contextmanager
    def based_on(self, ablate: Bool[Tensor, " E"]) -> Iterator[EdgePatcher]:
        """Inside the ``with``, runs are relative to the base mask ``ablate``: it is run once per prompt batch
        (a whole forward, recording its residual stream and sender activations), and a mask then re-runs only
        from the first receiver stage where it differs from the base (:class:`patching.suffix.EdgeSuffixRunner`).
        For searches whose masks are one circuit with a few edges changed (greedy's candidates, ACDC's
        trials), that skips every layer before the change. The numbers are those of plain runs (tested)."""
        base = self._check(ablate.reshape(1, -1), self._n_units, self._what)[0]
        st = self._st
        try:
            with torch.no_grad(), self._prepared():
                for part in self.parts:
                    self._use(part)
                    units: dict[str, Tensor] = {}
                    rec = Replay(self.model, part.B) if part.runner is not None else None
                    st.K = 1
                    self._set_chunk(base[None], -1)
                    try:
                        with self.model.hooks(fwd_hooks=self._hooks + self.wiring.capture_hooks(units, {})), \
                                rec.recording() if rec is not None else nullcontext():
                            logits = self._whole(part, 1)
                    finally:
                        self._reset()
                    self.forward_passes += 1
                    part.cache["base"] = (base, logits.float(), rec, units)
                    if part.runner is not None:
                        part.runner.base = (base, rec)
                st.part = None
            yield self
        finally:
            for part in self.parts:
                part.cache.pop("base", None)
                if part.runner is not None:
                    part.runner.base = None

    # ---- the complement form --------------------------------------------------------------------------
    def _comp_dtype(self) -> bool:
        return self._complement and self.wiring.dtype in (torch.float32, torch.float64)

    @staticmethod
    def _point(r: ReceiverGroup) -> Any:
        """Which residual stream a receiver group reads: attention inputs of a layer share one."""
        return r.hook if r.mode == "resid" else ("attn", r.layer)

    def _clean_hooks(self, points: dict[Any, Tensor]) -> list[Hook]:
        """On the clean forward: the residual stream at every receiver group's input (``[b, P, d]``)."""
        if not self._comp_dtype() or not self.graph.n_edges:
            return []
        hooks: list[Hook] = []
        seen: set[Any] = set()
        for r in self.wiring.receivers:
            key = self._point(r)
            if key in seen:  # a layer's q / k / v groups read one residual stream: one hook
                continue
            seen.add(key)

            def keep(x: Tensor, hook: Any, _k: Any = key, _split: bool = r.mode == "split") -> None:
                points[_k] = (x[:, :, 0] if _split else x).detach().clone()
            hooks.append((r.ln_hook if r.mode == "projected" else r.hook, keep))
        return hooks

    def _full_inputs(self, part: Any) -> list[Tensor]:
        """Per receiver group, its input with every edge into it ablated (``R_r``, ``[b, P, d]``), built once
        per prompt batch from the clean residual stream and the clean sender differences."""
        if "full" in part.cache:
            return part.cache["full"]
        w = self.wiring
        b, P, d = part.B, part.P, w.d_model
        prefixes = sorted({r.prefix for r in w.receivers})
        cum: dict[int, Tensor] = {}
        run = torch.zeros(b, P, d, dtype=w.dtype, device=w.device)
        j = 0
        for g in sorted((g for g in w.senders if g.s0 is not None), key=lambda g: g.s0):
            while j < len(prefixes) and prefixes[j] <= g.s0:
                cum[prefixes[j]] = run.clone()
                j += 1
            for u0 in range(0, g.s1 - g.s0, 64):  # bounded memory for wide groups (neurons)
                units = torch.arange(u0, min(u0 + 64, g.s1 - g.s0), device=g.device)
                diff = (g.out(part.abl_units[g.key], units) - g.out(part.clean_units[g.key], units))
                while j < len(prefixes) and prefixes[j] < g.s0 + int(units[-1]) + 1:  # a prefix inside the group
                    inside = prefixes[j] - g.s0 - u0
                    cum[prefixes[j]] = run + diff[:, :, :inside].sum(2).to(run.device)
                    j += 1
                run = run + diff.sum(2).to(run.device)
        while j < len(prefixes):
            cum[prefixes[j]] = run
            j += 1
        shared: dict[Any, Tensor] = {}
        full = []
        for r in w.receivers:
            key = (self._point(r), r.prefix)
            if key not in shared:
                shared[key] = (part.points[self._point(r)].to(run.device) + cum[r.prefix]).to(r.device)
            full.append(shared[key])
        part.cache["full"] = full
        return full

    # ---- planning -----------------------------------------------------------------------------------
    def _rerun(self, stage: int) -> Tensor:
        """``[S]``: the senders re-run by a chunk starting at ``stage`` (``-1``: whole forwards)."""
        return self._sender_stage >= max(stage, 0)

    def _sender_use(self, masks: Tensor) -> Tensor:
        """``[K, S]``: which senders each mask ablates an edge of."""
        k, e = masks.nonzero(as_tuple=True)
        used = torch.zeros(masks.shape[0], self.wiring.S, dtype=torch.bool, device=masks.device)
        used[k, self.wiring.edge_sender[e]] = True
        return used

    def _plan_masks(self, masks: Tensor, stage: int) -> tuple[Tensor, Tensor]:
        used, rerun = self._sender_use(masks), self._rerun(stage)
        return used & rerun, used & ~rerun

    # ---- one chunk ----------------------------------------------------------------------------------
    def _set_chunk(self, mask: Tensor, stage: int) -> None:
        st, w, part = self._st, self.wiring, self._st.part
        K, b, P, d = mask.shape[0], part.B, part.P, w.d_model
        c = _Chunk()
        c.verify = self._verifying
        active = mask.any(0)
        c.recv_on = [bool(active[r.edge_idx.to(active.device)].any()) for r in w.receivers]
        # per receiver group: the direct form reads the senders of its ablated edges, the complement form those
        # of its kept edges (module docstring); take the one with fewer, where the complement is verified
        eff = mask
        reads: list[Tensor | None] = []
        for r in w.receivers:
            if not c.recv_on[r.i]:
                c.comp.append(None)
                reads.append(None)
                continue
            idx = r.edge_idx.to(mask.device)
            sub = mask[:, idx]                                                          # [K, R, prefix]
            comp = None
            if self._comp_ok[r.i] and not c.verify:  # per mask, so a mask's numbers do not depend on its chunk
                k = (~sub).any(1).sum(-1) + 1 < sub.any(1).sum(-1)                    # [K]
                if bool(k.any()):
                    if eff is mask:
                        eff = mask.clone()
                    sel = eff[:, idx]
                    sel[k] = ~sub[k]
                    eff[:, idx] = sel
                    comp = k.to(r.device)
            c.comp.append(comp)
            reads.append((eff[:, idx] if comp is not None else sub).any(0).any(0))
        used = self._sender_use(eff).any(0)
        rerun = self._rerun(stage)
        live = (used & rerun).nonzero()[:, 0].tolist()
        up = (used & ~rerun).nonzero()[:, 0].tolist()
        c.cut_live = [bisect_left(live, r.prefix) for r in w.receivers]
        c.cut_up = [bisect_left(up, r.prefix) for r in w.receivers]
        live_t = torch.tensor(live, dtype=torch.long, device=mask.device)
        up_t = torch.tensor(up, dtype=torch.long, device=mask.device)
        for r in w.receivers:  # explicit columns where a group reads clearly fewer than its prefix of the list
            cl = cu = None
            if reads[r.i] is not None:
                a, u = c.cut_live[r.i], c.cut_up[r.i]
                cols = reads[r.i][live_t[:a]].nonzero()[:, 0]
                if 4 * len(cols) <= 3 * a:
                    cl = cols.to(r.device)
                cols = reads[r.i][up_t[:u]].nonzero()[:, 0]
                if 4 * len(cols) <= 3 * u:
                    cu = cols.to(r.device)
            c.cols_live.append(cl)
            c.cols_up.append(cu)
        mask = eff
        need_live: dict[torch.device, int] = {}
        need_up: dict[torch.device, int] = {}
        for r in w.receivers:
            if c.recv_on[r.i]:
                need_live[r.device] = max(need_live.get(r.device, 0), c.cut_live[r.i])
                need_up[r.device] = max(need_up.get(r.device, 0), c.cut_up[r.i])
        for dev in need_live:
            c.Mf[dev] = mask.to(device=dev, dtype=w.dtype)
            c.live[dev] = torch.tensor(live[:need_live[dev]], dtype=torch.long, device=dev)
            c.up[dev] = torch.tensor(up[:need_up[dev]], dtype=torch.long, device=dev)
            c.D[dev] = torch.zeros(K, need_live[dev], b * P * d, dtype=w.dtype, device=dev)
            c.Dc[dev] = torch.empty(need_up[dev], b * P * d, dtype=w.dtype, device=dev)
        c.sel = [None] * len(w.senders)
        for g in w.senders:
            if g.s0 is None:
                continue
            c0, c1 = bisect_left(live, g.s0), bisect_left(live, g.s1)
            if c1 > c0:  # re-run and used: its hook writes D[:, c0:c1]
                units = torch.tensor(live[c0:c1], dtype=torch.long, device=g.device) - g.s0
                c.sel[g.i] = (units, c0, c1)
            u0, u1 = bisect_left(up, g.s0), bisect_left(up, g.s1)
            if u1 > u0 and any(u0 < n for n in need_up.values()):  # upstream and used: clean difference now
                units = torch.tensor(up[u0:u1], dtype=torch.long, device=g.device) - g.s0
                cur = part.clean_units if "base" not in part.cache else part.cache["base"][3]  # not re-run: as in
                diff = g.out(part.abl_units[g.key], units) - g.out(cur[g.key], units)           # clean / base run
                diff = diff.expand(b, P, *diff.shape[2:]).permute(2, 0, 1, 3).reshape(u1 - u0, -1)
                for dev, n in need_up.items():
                    if u0 < n:
                        c.Dc[dev][u0:min(u1, n)] = diff[:min(u1, n) - u0].to(dev)
        st.edge = c

    def _check_full(self, r: ReceiverGroup, base: Tensor, add: Tensor | None) -> None:
        """Setup's all-ablated run: the direct form's change ``add`` must equal ``R_r - x`` (``base``)."""
        if self._comp_ok[r.i] is False:
            return
        want = base[:, 0].float()
        got = torch.zeros_like(want) if add is None else add[:, 0].float()
        scale = float(self._full_inputs(self._st.part)[r.i].abs().max()) or 1.0
        ok = float((got - want).abs().max()) <= 1e-4 * scale + 1e-5
        if not ok:
            log.info("edge patcher: receiver group %s: its input is not the sum of its senders' writes; it keeps "
                     "the direct form", r.key)
        self._comp_ok[r.i] = ok if self._comp_ok[r.i] is None else bool(self._comp_ok[r.i]) and ok

    # ---- hooks --------------------------------------------------------------------------------------
    def _build_hooks(self) -> list[Hook]:
        w, st = self.wiring, self._st
        hooks: list[Hook] = w.ln_hooks(st.scratch)

        def sender_hook(g: SenderGroup):
            def fn(x: Tensor, hook: Any) -> None:
                c = st.edge
                sel = None if c is None else c.sel[g.i]
                if sel is None:
                    return None
                units, c0, c1 = sel
                abl = g.out(st.part.abl_units[g.key], units).permute(2, 0, 1, 3)   # [a, b|1, P|1, d]
                cur = g.out(g.units(x), units)                                      # [N | 1, Q, a, d]
                Q, a = cur.shape[1], c1 - c0
                if cur.shape[0] != st.N:
                    cur = cur.expand(st.N, *cur.shape[1:])
                cur = cur.reshape(st.K, st.B, Q, a, -1).permute(0, 3, 1, 2, 4)    # [K, a, b, Q, d]
                if Q != st.P:  # run at the prediction positions only (last MLP): differences there
                    pos = st.pos.to(abl.device)
                    ab = abl.expand(a, st.B, st.P, abl.shape[-1])[:, torch.arange(st.B, device=abl.device), pos]
                    diff = ab.unsqueeze(2).unsqueeze(0) - cur                      # [K, a, b, 1, d]
                    for dev, buf in c.D.items():
                        n = buf.shape[1]
                        if c0 < n:
                            view = buf.view(st.K, n, st.B, st.P, -1)
                            hi = min(c1, n)
                            view[:, c0:hi, torch.arange(st.B, device=dev), st.pos.to(dev)] = \
                                diff[:, :hi - c0, :, 0].to(dev)
                    return None
                diff = (abl.unsqueeze(0) - cur).reshape(st.K, a, -1)
                for dev, buf in c.D.items():
                    n = buf.shape[1]
                    if c0 < n:
                        hi = min(c1, n)
                        buf[:, c0:hi] = diff[:, :hi - c0].to(dev)
                return None
            return fn

        def receiver_hook(r: ReceiverGroup):
            def fn(x: Tensor, hook: Any) -> Tensor | None:
                c = st.edge
                if c is None or not c.recv_on[r.i]:
                    return None
                dev, K = r.device, st.K
                a, u = c.cut_live[r.i], c.cut_up[r.i]
                at_pos = x.shape[1] != st.P
                Mf = c.Mf.get(dev)
                add = None
                cl, cu = c.cols_live[r.i], c.cols_up[r.i]
                if a and (cl is None or len(cl)):
                    D = c.D[dev][:, :a] if cl is None else c.D[dev][:, cl]  # cl < a: no slice first (a copy)
                    idx = c.live[dev][:a] if cl is None else c.live[dev][cl]
                    if at_pos:
                        D = _at_pos(D, st.B, st.P, st.pos)
                    add = torch.bmm(Mf[:, r.edge_idx[:, idx]], D)                               # [K, R, b*Q*d]
                if u and (cu is None or len(cu)):
                    Dc = c.Dc[dev][:u] if cu is None else c.Dc[dev][cu]
                    idx = c.up[dev][:u] if cu is None else c.up[dev][cu]
                    if at_pos:
                        Dc = _at_pos(Dc, st.B, st.P, st.pos)
                    Mu = Mf[:, r.edge_idx[:, idx]]                                             # [K, R, U_r]
                    up = (Mu.reshape(K * r.R, len(idx)) @ Dc).view(K, r.R, -1)
                    add = up if add is None else add + up
                comp = c.comp[r.i]
                if comp is not None or (c.verify and self._comp_ok[r.i] is not False):
                    resid = (x[:, :, 0] if r.mode == "split" else st.scratch[r.ln_hook] if r.mode == "projected"
                             else x)                                                           # [N, Q, d]
                    full = self._full_inputs(st.part)[r.i]
                    if at_pos:
                        full = full[torch.arange(st.B, device=full.device), st.pos.to(full.device)].unsqueeze(1)
                    base = (full.unsqueeze(0) - resid.reshape(K, st.B, -1, w.d_model)).reshape(K, 1, -1)
                    if c.verify:  # the direct form's input must equal R_r when every edge is ablated
                        self._check_full(r, base, add)
                    else:  # complement rows: R_r - x minus the kept edges' differences
                        comp = comp.view(K, 1, 1)
                        add = (torch.where(comp, base, 0.0).expand(K, r.R, base.shape[-1]) if add is None
                               else torch.where(comp, base - add, add))
                if add is None:
                    return None
                return r.apply(x, add.view(K, r.R, -1, w.d_model), st.scratch.get(r.ln_hook) if r.ln_hook else None)
            return fn

        hooks += [(g.hook, sender_hook(g)) for g in w.senders if g.s0 is not None]
        hooks += [(r.hook, receiver_hook(r)) for r in w.receivers]
        return hooks


__all__ = ["EdgePatcher"]
