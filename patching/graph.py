"""The component graph of a TransformerBridge: the units the engine ablates and the edges between them.

Every node kind is a registered class (:mod:`patching.kinds`): it lists its nodes, ids and hooks and says which
stage of a layer it writes in; :func:`build_graph` only asks the kinds. The built-in kinds give these nodes
(ids as in docs/architecture.md):

* ``embed`` (``hook_embed``) and ``pos_embed`` (``hook_pos_embed``, only when the model has learned
  absolute positions);
* every attention head ``a{L}.h{H}``. Its output is ``hook_z[..., H, :] @ W_O[H]`` (what
  ``blocks.L.attn.hook_result`` shows when per-head results are switched on). The attention output
  bias ``b_O`` is not per-head: it is a constant of the residual stream that no edge carries;
* every MLP ``m{L}`` (``blocks.L.hook_mlp_out``), except MLPs whose output projection is identically
  zero (the zoo's attention-only models keep zeroed MLPs) and all MLPs when the config says
  ``attn_only`` or ``circuitexplain_attn_only``;
* optionally every neuron ``m{L}.n{I}`` (``blocks.L.mlp.hook_post``): node-level only, never an edge
  end point;
* ``logits`` (input ``ln_final.hook_in``), the sink.

Registered kinds with ``default = False`` join when named: ``from_model(model, kinds=(...), without=(...))``.

Edges (auto-circuit's residual graph, Miller et al. 2024): every sender -> receiver pair the
residual stream allows. Sender order is the residual order (``embed``, ``pos_embed``, layer 0 heads,
``m0``, layer 1 heads, ...); attention of layer L reads everything before layer L, the MLP of layer L
also reads the heads of layer L. Attention receivers are split into their ``q``, ``k`` and ``v``
inputs (``a0.h1->a1.h2<k>``).

Model families:

* HF-backed bridges whose attention supports ``use_split_qkv_input`` (GPT-2, Llama, ... style):
  per-head q/k/v inputs are ``blocks.L.attn.hook_{q,k,v}_input`` (pre-ln1 residual copies per head),
  the MLP input is ``blocks.L.ln2.hook_in`` and the logits input ``ln_final.hook_in`` (editing those
  changes only the branch input, never the residual stream).
* Bridges without that fork (``TransformerBridge.boot_native`` models, plain ``AttentionBridge``):
  the engine emulates the per-head fork at ``blocks.L.attn.hook_{q,k,v}``: head h's query becomes
  ``ln1(x + delta_h) @ W_Q[h] + b_Q[h]`` with ``x`` read at ``blocks.L.ln1.hook_in`` (exact, see
  ``patching/wiring.py``); ``qkv_path`` in :attr:`ComponentGraph.meta` says which one is used.
* Recurrent / state-space / hybrid bridges (Mamba, RWKV, ...: blocks without an ``attn`` component)
  get node-level patching only: nodes ``embed``, ``b{L}`` (a whole block: its contribution
  ``blocks.L.hook_out - blocks.L.hook_in``) and ``logits``, ``supports_edges=False``. Edge calls
  raise a ``ValueError`` naming the reason, as they do for parallel attention/MLP blocks.
* Grouped-query attention (query heads sharing k/v heads) gets edges per *query* head: edge runs see
  the model ungrouped (``patching/gqa.py``), so ``a0.h1->a3.h2<k>`` is head 2's keys alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from patching.kinds import KINDS, unit_kind

log = logging.getLogger(__name__)

#: The built-in kinds of a component graph (every kind is a registered class: patching/kinds.py, ``KINDS``).
NODE_KINDS = ("embed", "pos_embed", "attn_head", "mlp", "neuron", "block", "logits")
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """One component. ``hook`` is the output hook for senders (TransformerLens name), the input hook
    for ``logits``; ``index`` is the neuron index for ``neuron`` nodes."""

    id: str
    kind: str
    layer: int | None
    head: int | None = None
    index: int | None = None
    hook: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "head": self.head,
                "index": self.index, "hook": self.hook}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(d["id"], d["kind"], d.get("layer"), d.get("head"), d.get("index"), d.get("hook", ""))


@dataclass(frozen=True)
class Edge:
    """``sender -> receiver``; ``input`` is ``q``/``k``/``v`` for attention receivers, else None."""

    sender: str
    receiver: str
    input: str | None = None

    @property
    def id(self) -> str:
        return f"{self.sender}->{self.receiver}" + (f"<{self.input}>" if self.input else "")

    @classmethod
    def parse(cls, edge_id: str) -> Edge:
        """The edge named ``a0.h1->a1.h2<k>`` (raises ``ValueError`` on a malformed id)."""
        if "->" not in edge_id:
            raise ValueError(f"edge id {edge_id!r} has no '->'")
        sender, receiver = edge_id.split("->", 1)
        inp = None
        if receiver.endswith(">") and "<" in receiver:
            receiver, inp = receiver[:-1].split("<", 1)
            if inp not in QKV:
                raise ValueError(f"edge id {edge_id!r}: input must be one of q, k, v")
        return cls(sender, receiver, inp)


@dataclass(frozen=True, eq=False)
class ComponentGraph:
    """Nodes and edges of one model (see the module docstring). Build with :meth:`from_model`.

    Attributes:
        nodes: senders in residual order, then ``logits`` (neuron nodes follow their MLP).
        edges: grouped by receiver in residual order; within an attention receiver by input
            (q, k, v); within a receiver input by sender order.
        supports_edges: False for models with node-level patching only (``meta['edge_reason']``).
        meta: json-able facts the engine needs (hooks, paths, sizes).
    """

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    supports_edges: bool
    meta: dict[str, Any] = field(default_factory=dict)
    node_index: dict[str, int] = field(init=False, repr=False)
    edge_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ni = {n.id: i for i, n in enumerate(self.nodes)}
        if len(ni) != len(self.nodes):
            raise ValueError("ComponentGraph: duplicate node ids")
        ei = {e.id: i for i, e in enumerate(self.edges)}
        if len(ei) != len(self.edges):
            raise ValueError("ComponentGraph: duplicate edge ids")
        for e in self.edges:
            if e.sender not in ni or e.receiver not in ni:
                raise ValueError(f"ComponentGraph: edge {e.id} names an unknown node")
        object.__setattr__(self, "node_index", ni)
        object.__setattr__(self, "edge_index", ei)

    # ---- sizes and views -------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def neurons(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind == "neuron")

    @property
    def n_neurons(self) -> int:
        return sum(1 for n in self.nodes if n.kind == "neuron")

    @property
    def senders(self) -> tuple[str, ...]:
        """Edge senders in residual order."""
        return tuple(self.meta.get("senders", ()))

    def node(self, node_id: str) -> Node:
        if node_id not in self.node_index:
            raise KeyError(f"unknown node {node_id!r}")
        return self.nodes[self.node_index[node_id]]

    def incoming(self, receiver: str, input: str | None = None) -> list[int]:
        """Indices of the edges into ``receiver`` (one input of it when ``input`` is given)."""
        return [i for i, e in enumerate(self.edges)
                if e.receiver == receiver and (input is None or e.input == input)]

    def outgoing(self, sender: str) -> list[int]:
        return [i for i, e in enumerate(self.edges) if e.sender == sender]

    def edge_mask(self, ids: list[str] | tuple[str, ...] | set[str]) -> Bool[Tensor, " E"]:
        """A boolean vector over edges, True at the given edge ids."""
        mask = torch.zeros(self.n_edges, dtype=torch.bool)
        for i in ids:
            if i not in self.edge_index:
                raise KeyError(f"unknown edge {i!r}")
            mask[self.edge_index[i]] = True
        return mask

    def node_mask(self, ids: list[str] | tuple[str, ...] | set[str]) -> Bool[Tensor, " N"]:
        """A boolean vector over nodes, True at the given node ids."""
        mask = torch.zeros(self.n_nodes, dtype=torch.bool)
        for i in ids:
            mask[self.node_index[self.node(i).id]] = True
        return mask

    def require_edges(self, where: str) -> None:
        """Raise a one-line ``ValueError`` when this graph cannot do edge patching."""
        if not self.supports_edges:
            raise ValueError(f"{where}: model {self.meta.get('model', '?')!r} supports node-level "
                             f"patching only ({self.meta.get('edge_reason', 'no edges')})")

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Json-able description (for provenance); :meth:`from_dict` restores it."""
        return {"nodes": [n.to_dict() for n in self.nodes], "edges": [e.id for e in self.edges],
                "supports_edges": self.supports_edges, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComponentGraph:
        return cls(tuple(Node.from_dict(n) for n in d["nodes"]), tuple(Edge.parse(e) for e in d["edges"]),
                   bool(d["supports_edges"]), dict(d.get("meta", {})))

    @classmethod
    def from_model(cls, model: Any, *, neurons: bool = False, kinds: tuple[str, ...] = (),
                   without: tuple[str, ...] = ()) -> ComponentGraph:
        """The component graph of ``model`` (a TransformerBridge); ``neurons`` adds MLP neurons, ``kinds`` any
        other registered non-default unit kinds (:mod:`patching.kinds`), ``without`` leaves kinds out."""
        from patching.model_info import inspect_model

        graph_kinds(kinds=kinds, without=without)  # unknown kind names fail before the model is inspected
        info = inspect_model(model)
        return build_graph(info, neurons=neurons, kinds=kinds, without=without)


def graph_kinds(*, neurons: bool = False, kinds: tuple[str, ...] | list[str] = (),
                without: tuple[str, ...] | list[str] = ()) -> list[Any]:
    """The registered unit kinds a graph holds: every default kind, ``neuron`` with ``neurons``, and ``kinds``,
    less ``without`` (e.g. a coarser graph with another kind in place of the heads)."""
    for k in (*kinds, *without):
        unit_kind(k)  # unknown names: one line naming the registered kinds
    want = set(kinds) | ({"neuron"} if neurons else set())
    return [k for k in KINDS.values() if (k.default or k.name in want) and k.name not in without]


def build_graph(info: dict[str, Any], *, neurons: bool = False, kinds: tuple[str, ...] | list[str] = (),
                without: tuple[str, ...] | list[str] = ()) -> ComponentGraph:
    """Pure construction of the graph from :func:`patching.model_info.inspect_model`'s facts.

    Every node, id and edge comes from the unit kinds (:mod:`patching.kinds`): the inputs, then per layer the
    kinds of its attention stage and of its MLP stage (registration order within a stage), then the sink.
    A receiver at ``(L, stage)`` reads every sender at an earlier position (in parallel blocks, the MLP reads
    what attention reads); the logits read every sender. ``kinds`` adds registered non-default kinds, ``without``
    leaves kinds out."""
    chosen = graph_kinds(neurons=neurons, kinds=kinds, without=without)
    meta = dict(info)
    recurrent = info["family"] == "recurrent"  # no residual graph: node-level patching only
    nodes: list[Node] = []
    where: list[tuple[int, int]] = []  # each node's position in the residual order: (layer, stage), inputs first
    spec: list[Any] = []

    def add(k: Any, layer: int | None, pos: tuple[int, int]) -> None:
        for d in k.nodes(info, layer):
            nodes.append(Node(d["id"], k.name, d.get("layer"), d.get("head"), d.get("index"), d.get("hook", "")))
            where.append(pos)
            spec.append(k)

    for k in chosen:
        if k.is_input:
            add(k, None, (-1, 0))
    layered = sorted((k for k in chosen if not (k.is_input or k.is_sink)), key=lambda k: k.stage)
    for L in range(info["n_layers"]):
        for k in layered:
            add(k, L, (L, k.stage))
    for k in chosen:
        if k.is_sink:
            add(k, None, (info["n_layers"], 0))
    senders = [] if recurrent else [i for i, k in enumerate(spec) if k.edge_sender]
    meta["senders"] = [nodes[i].id for i in senders]

    edges: list[Edge] = []
    supports = bool(info["supports_edges"]) and not recurrent
    if supports:
        for r, k in enumerate(spec):
            if not k.inputs:
                continue
            at = where[r] if k.is_sink or not info["parallel"] else (where[r][0], 0)
            reads = [nodes[s].id for s in senders if where[s] < at]
            for inp in k.inputs:
                edges.extend(Edge(s, nodes[r].id, inp) for s in reads)
    return ComponentGraph(tuple(nodes), tuple(edges), supports, meta)


__all__ = ["Node", "Edge", "ComponentGraph", "build_graph", "graph_kinds", "NODE_KINDS", "QKV"]
