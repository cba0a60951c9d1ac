"""Where the engine reads and writes: sender and receiver groups of a (model, graph) pair.

A *sender group* is the set of graph units whose output one hook produces (``hook_embed``; the heads
of a layer at ``hook_z``; an MLP at ``hook_mlp_out``; a layer's neurons at ``mlp.hook_post``; a block
of a recurrent model). Activations are handled in *unit form* ``[N, P, n, f]`` (n units of f features:
embed ``[N, P, 1, d]``, heads ``[N, P, H, d_head]``, neurons ``[N, P, m, 1]``); ablation values are
stored in that form, and :meth:`SenderGroup.out` maps unit form to each unit's residual-stream
output ``[N, P, n, d_model]`` (for heads ``z_h @ W_O[h]``).

A *receiver group* is one input of one layer's receivers (the q inputs of all heads of layer L, the
MLP input of layer L, the logits input) with an index tensor ``edge_idx [R, S_r]``: the edge index of
(receiver r, sender s) for the ``S_r`` senders it reads (always a prefix of the sender order). With
``qkv_path == "split"`` the q/k/v groups edit ``blocks.L.attn.hook_{q,k,v}_input`` (TransformerLens'
per-head residual copies, ``use_split_qkv_input``). With ``qkv_path == "projected"`` (the default when
valid: no per-head fork of the whole residual stream, ~1.7x faster) they hook
``blocks.L.attn.hook_{q,k,v}`` and give head h the residual-space input ``x + delta_h`` by recomputing
``q_h = ln1(x + delta_h) @ W_Q[h] + b_Q[h]`` with ``x`` read at ``blocks.L.ln1.hook_in`` (without a
norm, ``q_h += delta_h @ W_Q[h]``); ``inspect_model`` checks on a tiny input that ``hook_q`` really is
``ln1(x) @ W_Q + b_Q`` before it lets a graph use this path.

Everything is built once per patcher; the hooks in ``exact.py`` / ``attribution.py`` only index.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.gqa import repeat_heads, ungrouped
from patching.graph import QKV, ComponentGraph
from patching.kinds import UnitKind, group_kind, unit_kind
from patching.model_info import model_device, model_dtype
from patching.senders import group_family

Hook = tuple[str, Callable[..., Any]]


@dataclass
class SenderGroup:
    i: int                      # position in Wiring.senders
    key: str                    # "embed", "pos_embed", "attn3", "mlp3", "neurons3", "block3"
    kind: str                   # "embed", "pos_embed", "heads", "mlp", "neurons", "block"
    layer: int | None
    hook: str
    node_idx: Tensor            # [n] graph node indices of the units
    s0: int | None = None       # slice of the sender order (edge senders only)
    s1: int | None = None
    W_O: Tensor | None = None   # heads: [H, d_head, d_model]
    in_hook: str | None = None  # blocks: where the block input is read
    device: torch.device | None = None  # where its hook runs (multi-GPU: its layer's device)
    family: Any = None          # its sender family (patching/senders.py): unit form and residual write
    unit_kind: UnitKind | None = None  # its nodes' kind (patching/kinds.py): stage, input or not, ...

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = group_family(self.kind, self.hook, W_O=self.W_O, in_hook=self.in_hook)
        if self.unit_kind is None:
            self.unit_kind = group_kind(self.kind)

    @property
    def stage(self) -> int | None:
        """Its stage in its layer (0: attention, 1: MLP; ``None``: a model input)."""
        return self.unit_kind.stage

    @property
    def is_input(self) -> bool:
        """A model input (an embedding): EAP-IG interpolates it."""
        return self.unit_kind.is_input

    @property
    def n(self) -> int:
        return int(self.node_idx.numel())

    def units(self, x: Tensor, block_in: Tensor | None = None) -> Tensor:
        return self.family.units(x, block_in)

    def from_units(self, u: Tensor, block_in: Tensor | None = None) -> Tensor:
        return self.family.from_units(u, block_in)

    def out(self, u: Tensor, units: Tensor | None = None) -> Tensor:
        """Residual-stream output of each unit (of the ``units`` indices only, when given), ``[..., n, d_model]``."""
        return self.family.out_units(u, units)


@dataclass
class ReceiverGroup:
    i: int
    key: str                     # "a3.q", "m3", "logits"
    layer: int | None
    input: str | None
    hook: str
    mode: str                    # "split" [N,P,R,d] | "resid" [N,P,d] | "projected" (hook_q/k/v)
    edge_idx: Tensor             # [R, S_r]
    W: Tensor | None = None      # projected: [H, d_model, d_head]
    b: Tensor | None = None      # projected: [H, d_head] (None: no bias)
    ln: Any = None               # projected: ln1's module (None when the model has no norm)
    ln_hook: str | None = None
    fused: Any = None            # projected: patching.norms.fused_norm_projection(ln, W, b) or None
    device: torch.device | None = None  # where its hook runs (multi-GPU: its layer's device)
    stage: int | None = None     # its stage in its layer (0: attention, 1: MLP; None: the logits)

    @property
    def R(self) -> int:
        return int(self.edge_idx.shape[0])

    @property
    def prefix(self) -> int:
        return int(self.edge_idx.shape[1])

    def apply(self, x: Tensor, add: Tensor, resid: Tensor | None) -> Tensor:
        """Receiver input ``x`` (as its hook sees it, ``N = K * B`` rows) given the residual-space change
        ``add [K, R, B*P, d]`` of each of the ``R`` receivers; ``resid`` is ln1's input (projected mode)."""
        K, R = add.shape[0], add.shape[1]
        N, P = x.shape[0], x.shape[1]

        def rows_first(t: Tensor) -> Tensor:  # [K, R, B*P, f] -> [N, P, R, f]
            return t.view(K, R, N // K, P, -1).permute(0, 2, 3, 1, 4).reshape(N, P, R, -1)

        if self.mode == "resid":
            return x + add.reshape(x.shape)
        if self.mode == "split":
            return x + rows_first(add)
        if self.ln is None:  # linear: the change of the input maps straight through W
            return x + rows_first(torch.matmul(add, self.W))
        y = resid.reshape(K, 1, -1, resid.shape[-1]) + add
        if self.fused is not None:
            return rows_first(self.fused(y))
        out = rows_first(torch.matmul(self.ln(y), self.W))
        return out if self.b is None else out + self.b


def projection(attn: Any, inp: str, dtype: torch.dtype, n_heads: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(W [H, d_model, d_head], b [H, d_head] | None)`` of an attention bridge's q, k or v projection; with
    ``n_heads``, grouped k/v heads are repeated to one per query head (``patching/gqa.py``)."""
    W = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[inp].detach().to(dtype)
    b = {"q": attn.b_Q, "k": attn.b_K, "v": attn.b_V}[inp]
    b = None if b is None else b.detach().to(dtype)
    if n_heads is not None and W.shape[0] != n_heads:
        W = repeat_heads(W, n_heads)
        b = None if b is None else repeat_heads(b, n_heads)
    return W, b


class Wiring:
    """Sender and receiver groups of ``graph`` on ``model`` (see the module docstring)."""

    def __init__(self, model: Any, graph: ComponentGraph, *, qkv_path: str | None = None):
        self.model, self.graph = model, graph
        self.device, self.dtype = model_device(model), model_dtype(model)
        meta = graph.meta
        self.family = meta.get("family", "transformer")
        self.qkv_path = qkv_path or meta.get("qkv_path", "split")
        if graph.supports_edges and self.qkv_path not in meta.get("qkv_paths", [self.qkv_path]):
            raise ValueError(f"qkv_path {self.qkv_path!r} is not available for {meta.get('model', 'this model')}; "
                             f"choose one of {meta.get('qkv_paths')}")
        self.d_model = int(meta["d_model"])
        # grouped-query attention: edge runs see the ungrouped model (one k/v input per query head)
        self.ungroup = bool(graph.supports_edges and graph.n_edges
                            and int(meta.get("n_kv_heads") or meta.get("n_heads", 0)) != int(meta.get("n_heads", 0)))
        self.S = len(graph.senders)
        self.senders: list[SenderGroup] = []
        self.receivers: list[ReceiverGroup] = []
        self._build_senders()
        if graph.supports_edges and graph.n_edges:
            self._build_receivers()
        # edge -> sender position, for activity checks
        sidx = {s: i for i, s in enumerate(graph.senders)}
        self.edge_sender = torch.tensor([sidx[e.sender] for e in graph.edges], dtype=torch.long,
                                        device=self.device)

    # ---- construction ---------------------------------------------------------------------
    def layer_device(self, layer: int | None, *, logits: bool = False) -> torch.device:
        """The device of a layer's parameters (``None``: the embedding; ``logits``: the unembedding). With one
        device this is the model's device; with ``n_devices`` / ``device_map`` each layer's own, which is where
        its hooks run, so every buffer a hook reads is placed there."""
        mod = (getattr(self.model, "unembed", None) if logits else
               getattr(self.model, "embed", None) if layer is None else self.model.blocks[layer])
        for p in (mod.parameters() if mod is not None else ()):
            return p.device
        return self.device

    def _idx(self, ids: list[str]) -> Tensor:
        return torch.tensor([self.graph.node_index[i] for i in ids], dtype=torch.long, device=self.device)

    def _add_sender(self, **kw: Any) -> None:
        kw.setdefault("device", self.layer_device(kw.get("layer")))
        self.senders.append(SenderGroup(i=len(self.senders), **kw))

    def _build_senders(self) -> None:
        """One sender group per (kind, layer): its hook, family, ``W_O`` and device come from the node's unit
        kind (:meth:`patching.kinds.UnitKind.sender`)."""
        g, order = self.graph, {s: i for i, s in enumerate(self.graph.senders)}
        by_layer: dict[tuple[str, int | None], list[str]] = {}
        for n in g.nodes:
            if not unit_kind(n.kind).is_sink:
                by_layer.setdefault((n.kind, n.layer), []).append(n.id)
        for (kind, layer), ids in by_layer.items():
            s0 = order.get(ids[0])
            s1 = None if s0 is None else s0 + len(ids)
            spec = unit_kind(kind)
            self._add_sender(**spec.sender(self, layer, ids), node_idx=self._idx(ids), s0=s0, s1=s1,
                             unit_kind=spec)

    def _build_receivers(self) -> None:
        """One receiver group per (layer component, input); its hook, mode and projections come from the
        receiving node's unit kind (:meth:`patching.kinds.UnitKind.receiver`)."""
        g = self.graph
        groups: dict[tuple[str, str | None], list[list[int]]] = {}
        rows: dict[tuple[str, str | None], list[int]] = {}
        for i, e in enumerate(g.edges):
            rows.setdefault((e.receiver, e.input), []).append(i)
        meta = g.meta
        # one group per (layer component, input); receivers inside a group share a sender prefix
        for (recv, inp), idx in rows.items():
            node = g.node(recv)
            groups.setdefault((unit_kind(node.kind).receiver_key(node, inp), inp), []).append(idx)
        for (key, inp), lists in groups.items():
            if len({len(x) for x in lists}) != 1:
                raise ValueError(f"receiver group {key}: receivers read different sender sets")
            edge_idx = torch.tensor(lists, dtype=torch.long, device=self.device)
            node = g.node(g.edges[lists[0][0]].receiver)
            spec, L = unit_kind(node.kind), node.layer
            spec.check_receivers(key, [g.node(g.edges[x[0]].receiver) for x in lists], meta)
            dev = spec.receiver_device(self, L)
            self.receivers.append(ReceiverGroup(i=len(self.receivers), key=key, layer=L, input=inp,
                                                edge_idx=edge_idx.to(dev), device=dev,
                                                **spec.receiver(self, L, inp, dev)))
        order = {s: i for i, s in enumerate(g.senders)}
        for r in self.receivers:  # sanity: every group reads a sender prefix in order
            senders = [order[g.edges[int(j)].sender] for j in r.edge_idx[0].tolist()]
            if senders != list(range(len(senders))):
                raise ValueError(f"receiver group {r.key}: senders are not a prefix of the residual order")
        assert all(e.input in (None, *QKV) for e in g.edges)

    # ---- helpers used by the runners ------------------------------------------------------
    def ln_hooks(self, scratch: dict[str, Tensor]) -> list[Hook]:
        """Hooks that record each projected layer's ln1 input (and each block input) in ``scratch``."""
        hooks: list[Hook] = []
        seen: set[str] = set()
        names = [r.ln_hook for r in self.receivers if r.mode == "projected"]
        names += [s.in_hook for s in self.senders if s.in_hook]
        for name in names:
            if name and name not in seen:
                seen.add(name)

                def keep(x: Tensor, hook: Any, _n: str = name) -> None:
                    scratch.clear()  # only the current layer's input is read: free the earlier layers'
                    scratch[_n] = x
                hooks.append((name, keep))
        return hooks

    def capture_hooks(self, store: dict[str, Tensor], scratch: dict[str, Tensor]) -> list[Hook]:
        """Hooks recording every sender group's activation (unit form, detached) in ``store``."""
        hooks = self.ln_hooks(scratch) if any(s.in_hook for s in self.senders) else []
        for s in self.senders:
            def keep(x: Tensor, hook: Any, _s: SenderGroup = s) -> None:
                blk = scratch.get(_s.in_hook) if _s.in_hook else None
                store[_s.key] = _s.units(x, blk).detach().clone()
            hooks.append((s.hook, keep))
        return hooks

    def capture(self, tokens: Tensor, pos: Tensor | None = None, *,
                logits: bool = True) -> tuple[Tensor | None, dict[str, Tensor]]:
        """One forward on ``tokens``: every sender group's units and the logits (``[B, V]`` at ``pos``; ``[B, P, V]``
        without ``pos``; ``None`` with ``logits=False``)."""
        store: dict[str, Tensor] = {}
        scratch: dict[str, Tensor] = {}
        out = forward_logits(self.model, self.graph.meta, tokens, self.capture_hooks(store, scratch),
                             pos=pos, logits=logits)
        return out, store

    def needs_split(self) -> bool:
        return any(r.mode == "split" for r in self.receivers)




class _AtResidual(Exception):
    """Raised by the last hook of a forward to stop it at the final residual stream."""


def forward_logits(model: Any, meta: dict[str, Any], tokens: Tensor, hooks: list[Hook], *, pos: Tensor | None = None,
                   logits: bool = True) -> Tensor | None:
    """``model(tokens)`` with ``hooks``, computing only the logits asked for: at the prediction positions ``pos``
    (``[B, V]``), none (``logits=False``), or all (``[B, P, V]``, when ``pos`` is None). When the model's logits are
    the unembedding of the final residual stream (``meta['logits_at_pos']``, checked by ``inspect_model``), the
    forward stops there, and the unembedding (the largest single cost of a small model with a large vocabulary)
    runs at the positions asked for only; otherwise the whole forward runs and the positions are gathered."""
    from patching.metrics import gather_pos
    from patching.model_info import logits_from_residual

    if (pos is None and logits) or not meta.get("logits_at_pos"):
        with model.hooks(fwd_hooks=hooks):
            out = model(tokens)
        return None if not logits else out if pos is None else gather_pos(out, pos)
    box: dict[str, Tensor] = {}

    def stop(x: Tensor, hook: Any) -> None:
        box["x"] = x
        raise _AtResidual

    try:
        with model.hooks(fwd_hooks=[*hooks, (meta["logits_hook"], stop)]):
            model(tokens)
    except _AtResidual:
        pass
    if not logits:
        return None
    x = box["x"]
    xp = x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)].unsqueeze(1)       # [B, 1, d]
    return logits_from_residual(model, xp)[:, 0]


@contextmanager
def prepared(model: Any, *, split_qkv: bool = False, ungroup: bool = False):
    """Eval mode, ``use_split_qkv_input == split_qkv`` and ``use_attn_result`` off (the engine derives
    per-head outputs from ``hook_z``; the fused output projection is faster), and with ``ungroup`` grouped-query
    attention ungrouped (``patching/gqa.py``); all restored in ``finally``."""
    with ungrouped(model, enable=ungroup), _flags(model, split_qkv):
        yield model


@contextmanager
def _flags(model: Any, split_qkv: bool):
    training = [m for m in model.modules() if m.training]  # eval() walks every module: only when needed
    flags = {"use_split_qkv_input": split_qkv, "use_attn_result": False}
    prev = {k: bool(getattr(model.cfg, k, False)) for k in flags}
    changed: list[str] = []
    if training:
        model.eval()
    try:
        for k, want in flags.items():
            if prev[k] != want:
                getattr(model, f"set_{k}")(want)
                changed.append(k)
        yield model
    finally:
        try:
            for k in reversed(changed):
                getattr(model, f"set_{k}")(prev[k])
        finally:
            for m in training:
                m.training = True


__all__ = ["Wiring", "SenderGroup", "ReceiverGroup", "prepared", "forward_logits"]
