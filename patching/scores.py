"""Scores: one number per edge, node or neuron, from exact patching or attribution.

``values[i]`` is the mean over the batch of ``m(ablated) - m(clean)`` when unit ``ids[i]`` alone is
ablated (exact patching: measured; AtP / EAP / EAP-IG: estimated to first order or by integrated
gradients). A large negative value on a higher-is-better metric marks an important unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from patching.graph import ComponentGraph

LEVELS = ("edge", "node", "neuron", "feature", "feature-edge")  # feature levels: patching/features.py


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-unit scores with their provenance (see the module docstring)."""

    graph: ComponentGraph
    level: str
    values: Float[Tensor, " n"]
    ids: tuple[str, ...]
    method: str
    ablation: str
    metric: str
    forward_passes: int
    seconds: float

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Scores: level must be one of {LEVELS}, got {self.level!r}")
        if self.values.dim() != 1 or self.values.shape[0] != len(self.ids):
            raise ValueError(f"Scores: values of shape {tuple(self.values.shape)} for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def as_dict(self) -> dict[str, float]:
        """``{unit id: score}``."""
        return dict(zip(self.ids, self.values.tolist(), strict=True))

    def top(self, k: int, *, by_abs: bool = True) -> list[tuple[str, float]]:
        """The ``k`` highest-scoring units (by magnitude unless ``by_abs=False``), best first."""
        key = self.values.abs() if by_abs else self.values
        order = torch.argsort(key, descending=True, stable=True)[:k].tolist()
        return [(self.ids[i], float(self.values[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        """Json-able (the graph as its description)."""
        return {"level": self.level, "ids": list(self.ids), "values": self.values.tolist(),
                "method": self.method, "ablation": self.ablation, "metric": self.metric,
                "forward_passes": self.forward_passes, "seconds": self.seconds, "graph": self.graph.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], graph: ComponentGraph | None = None) -> Scores:
        if graph is not None:
            g = graph
        elif d["level"] in ("feature", "feature-edge"):
            # a feature graph's bases are not serialised: pass graph= to score with it again
            from patching.features import FeatureGraph

            g = FeatureGraph.from_dict(d["graph"])
        else:
            g = ComponentGraph.from_dict(d["graph"])
        return cls(graph=g, level=d["level"], values=torch.tensor(d["values"], dtype=torch.float32),
                   ids=tuple(d["ids"]), method=d["method"], ablation=d["ablation"], metric=d["metric"],
                   forward_passes=int(d["forward_passes"]), seconds=float(d["seconds"]))


def unit_ids(graph: ComponentGraph, level: str) -> tuple[str, ...]:
    """The ids a ``level`` score vector is aligned with."""
    if level == "edge":
        return tuple(e.id for e in graph.edges)
    if level == "node":
        return tuple(n.id for n in graph.nodes)
    if level == "neuron":
        return tuple(n.id for n in graph.nodes if n.kind == "neuron")
    if level == "feature":
        return tuple(graph.ids)
    if level == "feature-edge":
        return tuple(e.id for e in graph.edges)
    raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")


__all__ = ["Scores", "LEVELS", "unit_ids"]
