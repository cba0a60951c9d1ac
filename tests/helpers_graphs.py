"""Shared helpers for tests of circuit graphs."""

from __future__ import annotations

import json
from typing import Any


def comparable(G: Any) -> dict[str, Any]:
    """A CircuitGraph as plain JSON data without the fields that differ between identical runs
    (``created``, ``seconds`` and other ``*_seconds`` timings): two runs of the same discovery must give
    equal values."""
    data = json.loads(json.dumps({"graph": dict(G.graph), "nodes": list(G.nodes(data=True)),
                                  "edges": list(G.edges(data=True))}))
    for key in ("created", "seconds"):
        data["graph"].pop(key)
    for key in [k for k in data["graph"] if k.endswith("_seconds")]:
        data["graph"].pop(key)
    return data
