"""Topological keys of ComponentGraph nodes and ACDC's receiver order (pure functions)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from patching.kinds import unit_kind

_INPUT_RANK = {"q": 0, "k": 1, "v": 2, None: 3}


def node_key(node: Any) -> tuple[float, int, int]:
    """Sort key putting every node after the nodes it can read from: inputs, then per layer attention
    heads (and recurrent blocks) before the MLP, then the logits (each kind's
    :meth:`patching.kinds.UnitKind.order_key`; an unknown kind raises a one-line ``ValueError``)."""
    try:
        kind = unit_kind(node.kind)
    except ValueError as e:
        raise ValueError(f"node {node.id!r}: {e}") from None
    return kind.order_key(node)


@dataclass(frozen=True)
class Receiver:
    """One receiver input (a node, and for attention heads its q / k / v input) with its incoming edges,
    listed in the order ACDC tries them (the latest sender first)."""

    node: str
    input: str | None
    edges: tuple[int, ...]

    @property
    def id(self) -> str:
        return self.node if self.input is None else f"{self.node}<{self.input}>"


def acdc_receivers(graph: Any) -> list[Receiver]:
    """ACDC's visiting order: receivers from the output back to the inputs.

    As in Conmy et al.'s implementation: the logits first, then layer by layer downwards; within a layer
    the MLP before the attention heads, the heads' query inputs (highest head first), then their keys,
    then their values. Each receiver's incoming edges are tried from the latest sender to the earliest.
    """
    nodes = {n.id: n for n in graph.nodes}
    groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for i, e in enumerate(graph.edges):
        groups[(e.receiver, e.input)].append(i)

    def rkey(item: tuple[tuple[str, str | None], list[int]]) -> tuple:
        (rid, inp), _ = item
        layer, kind, sub = node_key(nodes[rid])
        return (-layer, -kind, _INPUT_RANK.get(inp, 3), -sub)

    out = []
    for (rid, inp), idx in sorted(groups.items(), key=rkey):
        idx = sorted(idx, key=lambda i: node_key(nodes[graph.edges[i].sender]), reverse=True)
        out.append(Receiver(node=rid, input=inp, edges=tuple(idx)))
    return out
