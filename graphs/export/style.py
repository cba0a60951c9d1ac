"""Shared drawing conventions of the exporters (DOT, Cytoscape, GEXF, HTML).

Colour by sign of the score ``m(ablated) - m(clean)``: blue when ablating makes the metric worse (the unit
supports the task: the metric drops, or a divergence such as ``kl`` rises), red when it makes it better; grey
for parts outside the circuit. Width grows linearly with
``|score|`` relative to the largest ``|score|`` in the graph.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

SUPPORTS = "#2166ac"  # score < 0: ablating lowers the metric
OPPOSES = "#b2182b"  # score > 0: ablating raises the metric
NEUTRAL = "#9e9e9e"  # no score, or not in the circuit
KIND_FILL = {
    "embed": "#d9f0d3", "pos_embed": "#d9f0d3", "attn_head": "#fee8c8", "mlp": "#deebf7",
    "neuron": "#deebf7", "feature": "#e7d4e8", "error": "#f2f2f2", "block": "#f0f0f0", "logits": "#fddbc7",
}
#: Fill of an in-circuit node whose kind has no :data:`KIND_FILL` entry (a registered kind without a colour); the
#: HTML viewer's fallback (viewer.js) is the same.
DEFAULT_FILL = "#eeeeee"
COLUMN_SPACING = 220.0
ROW_SPACING = 60.0


LOWER_IS_BETTER = frozenset({"kl", "l2"})  # metrics where a larger value is worse (distances to the clean run)


def kind_fill(kind: str) -> str:
    """The fill of an in-circuit node of ``kind``: its :data:`KIND_FILL` entry, else :data:`DEFAULT_FILL` (a colour
    is optional for a registered kind)."""
    return KIND_FILL.get(kind, DEFAULT_FILL)


def sign_colour(score: float | None, metric: str | None = None) -> str:
    """Blue when the unit supports the task under ``metric`` (the graph's ``metric`` attribute), else red."""
    if score is None or score == 0:
        return NEUTRAL
    hurts = score > 0 if metric in LOWER_IS_BETTER else score < 0
    return SUPPORTS if hurts else OPPOSES


def max_abs_score(G: nx.DiGraph) -> float:
    scores = [abs(d["score"]) for _, _, d in G.edges(data=True) if "score" in d]
    return max(scores, default=0.0)


def edge_width(score: float | None, max_abs: float, lo: float = 0.5, hi: float = 6.0) -> float:
    """``lo`` for no score, up to ``hi`` for the largest ``|score|`` of the graph."""
    if score is None or max_abs <= 0:
        return lo
    return round(lo + (hi - lo) * min(abs(score) / max_abs, 1.0), 3)


def node_label(n: str, d: dict[str, Any]) -> str:
    return n if "score" not in d else f"{n}\n{d['score']:+.3g}"


def centred_positions(positions: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """Pixel positions: columns ``COLUMN_SPACING`` apart, each column's rows centred on y = 0."""
    counts: dict[int, int] = {}
    for col, _ in positions.values():
        counts[col] = counts.get(col, 0) + 1
    return {n: (col * COLUMN_SPACING, (row - (counts[col] - 1) / 2) * ROW_SPACING)
            for n, (col, row) in positions.items()}
