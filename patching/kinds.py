"""Unit kinds: everything the engine knows about one kind of graph node, in one class per kind (issue 12).

A *unit kind* (a :class:`UnitKind` subclass, registered with :func:`register_kind`) is the only place that
knows, for its nodes,

* **which exist and how they are named**: :meth:`UnitKind.nodes` lists a layer's nodes (id, hook, head /
  index) from :func:`patching.model_info.inspect_model`'s facts; :attr:`pattern` / :meth:`UnitKind.parse`
  read an id back (:func:`parse_node_id` is the one parser of component ids);
* **where they sit in the residual order**: :attr:`stage` (0: the attention stage of its layer, 1: the MLP
  stage; ``None``: before layer 0 for the inputs, after the last layer for the sink). A receiver at
  ``(L, s)`` reads every sender at an earlier ``(L', s')`` (in parallel blocks the MLP reads what attention
  reads); the ACDC order (:meth:`UnitKind.order_key`, :attr:`rank`);
* **how the engine reads and writes them as senders**: :meth:`UnitKind.sender` gives the sender group's hook,
  its family (:mod:`patching.senders`: the unit form and the residual write), ``W_O`` and device;
* **how they receive edges**: :attr:`inputs` and :meth:`UnitKind.receiver` (hook, mode, projections);
* **what the algorithms may do with them**: :attr:`is_input` (a model input: EAP-IG interpolates it),
  :attr:`ablatable` (a unit discovery may leave out of a circuit), :attr:`edge_sender` (False: node-level only),
  :attr:`replay_stage` (where the node-ablation suffix runner starts, ``patching/suffix.py``).

Built-in kinds: ``embed``, ``pos_embed``, ``attn_head``, ``mlp``, ``neuron``, ``block``, ``logits`` (the head /
MLP engine) and ``feature``, ``error`` (the feature engine, :mod:`patching.features`, which builds its own graph;
registered here for the algorithms' questions). A kind with ``default = False`` enters a
:class:`~patching.graph.ComponentGraph` only when named (``ComponentGraph.from_model(model, kinds=(...))``);
``neurons=True`` names ``neuron``. Adding a kind is one subclass and :func:`register_kind`
(tests/test_unit_kinds.py adds one inside the test).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from patching.senders import BlockFamily, EmbedFamily, HeadFamily, MLPFamily, NeuronFamily


class UnitKind:
    """One kind of graph node (module docstring). Subclasses set the class attributes and override what applies."""

    name: ClassVar[str] = ""                    # Node.kind
    group: ClassVar[str | None] = None          # its SenderGroup.kind (None: not a sender group)
    pattern: ClassVar[str] = ""                 # full-match regex of its ids; groups fill ``fields``
    fields: ClassVar[tuple[str, ...]] = ()      # Node fields the pattern's groups give ("layer", "head", "index")
    stage: ClassVar[int | None] = None          # 0 attention stage, 1 MLP stage; None: input or sink
    replay_stage: ClassVar[int] = 0             # node ablation: its layer's stage the suffix runner starts from
    is_input: ClassVar[bool] = False            # a model input (before every layer; EAP-IG interpolates it)
    is_sink: ClassVar[bool] = False             # the logits: after every layer, reads every sender
    ablatable: ClassVar[bool] = True            # a unit that discovery may leave out of a circuit
    edge_sender: ClassVar[bool] = True          # its nodes send edges (False: node-level only)
    inputs: ClassVar[tuple[str | None, ...]] = ()  # its receiver inputs (empty: receives no edges)
    rank: ClassVar[int] = 0                     # order within its layer (inputs: among the inputs)
    default: ClassVar[bool] = True              # in every ComponentGraph (False: only when named)

    # ---- ids and nodes ------------------------------------------------------------------------
    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        """This kind's nodes of ``layer`` (``None``: the inputs / the sink) as ``Node`` fields without ``kind``."""
        return []

    def parse(self, node_id: str) -> dict[str, Any] | None:
        """``{"kind", "layer", "head", "index"}`` of an id of this kind, or ``None``."""
        m = re.fullmatch(self.pattern, node_id) if self.pattern else None
        if m is None:
            return None
        out: dict[str, Any] = {"kind": self.name, "layer": None, "head": None, "index": None}
        out.update({f: int(v) for f, v in zip(self.fields, m.groups(), strict=True)})
        return out

    def order_key(self, node: Any) -> tuple[float, int, int]:
        """Sort key placing a node after every node it can read from (ACDC's order)."""
        if self.is_sink:
            return (float("inf"), 0, 0)
        if self.is_input:
            return (-1.0, 0, self.rank)
        sub = node.head if node.head is not None else (node.index if node.index is not None else 0)
        return (float(node.layer), self.rank, int(sub))

    # ---- the engine (patching/wiring.py) -------------------------------------------------------
    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        """``SenderGroup`` fields (``key``, ``kind``, ``layer``, ``hook``, ``family``, optional ``W_O``, ``in_hook``,
        ``device``) of this kind's nodes ``ids`` of one layer."""
        raise ValueError(f"node kind {self.name!r} has no sender group")

    def receiver_key(self, node: Any, inp: str | None) -> str:
        """The receiver group an input of ``node`` belongs to (receivers of one group share one hook)."""
        return node.id

    def check_receivers(self, key: str, nodes: list[Any], meta: dict[str, Any]) -> None:
        """Raise when the receivers of one group are not what :meth:`receiver` assumes."""

    def receiver_device(self, wiring: Any, layer: int | None) -> Any:
        return wiring.layer_device(layer)

    def receiver(self, wiring: Any, layer: int | None, inp: str | None, device: Any) -> dict[str, Any]:
        """``ReceiverGroup`` fields (``hook``, ``mode``, ``stage``, projected: ``W``, ``b``, ``ln``, ``fused``,
        ``ln_hook``) of one receiver group."""
        raise ValueError(f"node kind {self.name!r} receives no edges")


#: Registered kinds by ``Node.kind``, in registration order (the order of a layer's nodes within one stage).
KINDS: dict[str, UnitKind] = {}


def register_kind(cls: type[UnitKind]) -> type[UnitKind]:
    """Register a :class:`UnitKind` subclass (a class decorator); its ``name`` must be new."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a unit kind needs a name")
    old = KINDS.get(cls.name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ValueError(f"{cls.__name__}: node kind {cls.name!r} is already registered by {type(old).__name__}")
    KINDS[cls.name] = cls()
    return cls


def unit_kind(name: str) -> UnitKind:
    """The registered kind named ``name`` (a one-line ``ValueError`` naming the known ones otherwise)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown node kind {name!r}; registered: {', '.join(KINDS)}") from None


def group_kind(group: str) -> UnitKind:
    """The kind whose sender groups are called ``group`` (``SenderGroup.kind``)."""
    for k in KINDS.values():
        if k.group == group:
            return k
    raise ValueError(f"unknown sender kind {group!r}; one of {sorted(k.group for k in KINDS.values() if k.group)}")


def parse_node_id(node_id: str) -> dict[str, Any]:
    """``"a1.h3"`` -> ``{"kind": "attn_head", "layer": 1, "head": 3, "index": None}``: the one parser of component
    ids (every registered kind's :attr:`~UnitKind.pattern`); a one-line ``ValueError`` for anything else."""
    for k in KINDS.values():
        out = k.parse(node_id) if isinstance(node_id, str) else None
        if out is not None:
            return out
    raise ValueError(f"node id {node_id!r} not understood: expected one of the registered kinds' ids "
                     f"({', '.join(k.pattern for k in KINDS.values() if k.pattern)})")


# ---- the built-in kinds ------------------------------------------------------------------------

@register_kind
class EmbedKind(UnitKind):
    """The token embedding ``embed`` (``hook_embed``): a model input."""

    name = group = "embed"
    pattern = "embed"
    is_input = True
    ablatable = False  # the inputs are always part of a circuit

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        return [{"id": self.name, "layer": None, "hook": f"hook_{self.name}"}] if layer is None else []

    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        hook = f"hook_{self.name}"
        return {"key": self.name, "kind": self.name, "layer": None, "hook": hook,
                "family": EmbedFamily(hook, kind=self.name)}


@register_kind
class PosEmbedKind(EmbedKind):
    """The learned positional embedding ``pos_embed`` (``hook_pos_embed``), when the model has one."""

    name = group = "pos_embed"
    pattern = "pos_embed"
    rank = 1

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        return super().nodes(info, layer) if info["pos_embed"] else []


@register_kind
class AttnHeadKind(UnitKind):
    """Attention head ``a{L}.h{H}``: output ``hook_z[..., H, :] @ W_O[H]``; receives edges at its q, k, v inputs."""

    name, group = "attn_head", "heads"
    pattern, fields = r"a(\d+)\.h(\d+)", ("layer", "head")
    stage, rank = 0, 1
    inputs = ("q", "k", "v")

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        if layer is None or info["family"] == "recurrent":
            return []
        return [{"id": f"a{layer}.h{h}", "layer": layer, "head": h, "hook": f"blocks.{layer}.attn.hook_result"}
                for h in range(info["n_heads"])]

    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        heads = [wiring.graph.node(i).head for i in ids]
        if heads != list(range(len(heads))):
            raise ValueError(f"graph lists heads of layer {layer} out of order: {heads}")
        dev = wiring.layer_device(layer)
        W_O = wiring.model.blocks[layer].attn.W_O.detach().to(device=dev, dtype=wiring.dtype)
        hook = f"blocks.{layer}.attn.hook_z"
        return {"key": f"attn{layer}", "kind": self.group, "layer": layer, "hook": hook, "W_O": W_O, "device": dev,
                "family": HeadFamily(hook, W_O)}

    def receiver_key(self, node: Any, inp: str | None) -> str:
        return f"a{node.layer}.{inp}"

    def check_receivers(self, key: str, nodes: list[Any], meta: dict[str, Any]) -> None:
        heads = [n.head for n in nodes]
        if heads != list(range(int(meta["n_heads"]))):
            raise ValueError(f"receiver group {key}: edges into heads {heads} are not one per head in order")

    def receiver(self, wiring: Any, layer: int | None, inp: str | None, device: Any) -> dict[str, Any]:
        from patching.norms import fused_norm_projection
        from patching.wiring import projection

        meta = wiring.graph.meta
        if wiring.qkv_path == "split":
            return {"hook": f"blocks.{layer}.attn.hook_{inp}_input", "mode": "split", "stage": self.stage}
        W, b = projection(wiring.model.blocks[layer].attn, inp, wiring.dtype, int(meta["n_heads"]))
        W, b = W.to(device), None if b is None else b.to(device)
        ln = None if meta.get("normalization") is None else wiring.model.blocks[layer].ln1.original_component
        fused = None if ln is None else fused_norm_projection(ln, W, b)
        return {"hook": f"blocks.{layer}.attn.hook_{inp}", "mode": "projected", "stage": self.stage, "W": W, "b": b,
                "ln": ln, "fused": fused, "ln_hook": f"blocks.{layer}.ln1.hook_in"}


@register_kind
class MLPKind(UnitKind):
    """A whole MLP ``m{L}`` (``hook_mlp_out``); receives one edge input at its pre-norm input."""

    name = group = "mlp"
    pattern, fields = r"m(\d+)", ("layer",)
    stage, rank, replay_stage = 1, 2, 1
    inputs = (None,)

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        if layer is None or info["family"] == "recurrent" or layer not in set(info["mlp_layers"]):
            return []
        return [{"id": f"m{layer}", "layer": layer, "hook": f"blocks.{layer}.hook_mlp_out"}]

    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        hook = f"blocks.{layer}.hook_mlp_out"
        return {"key": f"mlp{layer}", "kind": self.group, "layer": layer, "hook": hook,
                "family": MLPFamily(hook, kind=self.group)}

    def receiver(self, wiring: Any, layer: int | None, inp: str | None, device: Any) -> dict[str, Any]:
        return {"hook": wiring.graph.meta["mlp_in_hooks"][str(layer)], "mode": "resid", "stage": self.stage}


@register_kind
class NeuronKind(UnitKind):
    """MLP neuron ``m{L}.n{I}`` (``mlp.hook_post``): node-level only; in a graph with ``neurons=True``."""

    name, group = "neuron", "neurons"
    pattern, fields = r"m(\d+)\.n(\d+)", ("layer", "index")
    stage, rank = 1, 2
    edge_sender, default = False, False

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        if layer is None or info["family"] == "recurrent" or layer not in set(info["mlp_layers"]):
            return []
        return [{"id": f"m{layer}.n{i}", "layer": layer, "index": i, "hook": f"blocks.{layer}.mlp.hook_post"}
                for i in range(info["d_mlp"])]

    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        index = [wiring.graph.node(i).index for i in ids]
        if index != list(range(len(index))):
            raise ValueError(f"graph lists neurons of layer {layer} partially or out of order")
        hook = f"blocks.{layer}.mlp.hook_post"
        return {"key": f"neurons{layer}", "kind": self.group, "layer": layer, "hook": hook,
                "family": NeuronFamily(hook, None)}


@register_kind
class BlockKind(UnitKind):
    """A whole block ``b{L}`` of a recurrent / state-space model: ``hook_out - hook_in``; node-level only."""

    name = group = "block"
    pattern, fields = r"b(\d+)", ("layer",)
    stage, rank = 1, 1
    edge_sender = False

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        if layer is None or info["family"] != "recurrent":
            return []
        return [{"id": f"b{layer}", "layer": layer, "hook": f"blocks.{layer}.hook_out"}]

    def sender(self, wiring: Any, layer: int | None, ids: list[str]) -> dict[str, Any]:
        hook, in_hook = f"blocks.{layer}.hook_out", f"blocks.{layer}.hook_in"
        return {"key": f"block{layer}", "kind": self.group, "layer": layer, "hook": hook, "in_hook": in_hook,
                "family": BlockFamily(hook, in_hook)}


@register_kind
class FeatureKind(UnitKind):
    """An SAE feature ``f{L}.{I}@{hook-short}`` of a spliced site (patching/features.py builds their graphs)."""

    name = "feature"
    pattern, fields = r"f(\d+)\.(\d+)(?:@\d+\.[A-Za-z0-9_.]+)?", ("layer", "index")
    stage, rank, default = 1, 2, False


@register_kind
class ErrorKind(UnitKind):
    """The reconstruction error ``err@{hook-short}`` of a spliced site: scored, never left out of a circuit."""

    name = "error"
    pattern, fields = r"err@(\d+)\.[A-Za-z0-9_.]+", ("layer",)
    stage, rank, default = 1, 2, False
    ablatable = False


@register_kind
class LogitsKind(UnitKind):
    """The sink ``logits``: reads every sender at the final residual stream (``ln_final.hook_in``)."""

    name = "logits"
    pattern = "logits"
    is_sink, ablatable, edge_sender = True, False, False
    inputs = (None,)

    def nodes(self, info: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
        return [{"id": self.name, "layer": None, "hook": info["logits_hook"]}] if layer is None else []

    def receiver_device(self, wiring: Any, layer: int | None) -> Any:
        return wiring.layer_device(layer, logits=True)

    def receiver(self, wiring: Any, layer: int | None, inp: str | None, device: Any) -> dict[str, Any]:
        return {"hook": wiring.graph.meta["logits_hook"], "mode": "resid", "stage": None}


__all__ = ["UnitKind", "KINDS", "register_kind", "unit_kind", "group_kind", "parse_node_id", "EmbedKind",
           "PosEmbedKind", "AttnHeadKind", "MLPKind", "NeuronKind", "BlockKind", "FeatureKind", "ErrorKind",
           "LogitsKind"]
