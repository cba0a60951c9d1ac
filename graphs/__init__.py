"""Circuits as networkx DiGraphs: schema (:mod:`graphs.circuit`), pure operations (:mod:`graphs.ops`)
and exporters (:mod:`graphs.export`). Pure networkx + stdlib: importing it never imports torch."""

from graphs.circuit import (
    add_component,
    add_connection,
    edge_ids,
    load,
    new_circuit,
    node_ids,
    parse_node_id,
    save,
    validate,
)
from graphs.ops import compare, intersect, mark, prune, union

__all__ = ["add_component", "add_connection", "compare", "edge_ids", "intersect", "load", "mark", "new_circuit",
           "node_ids", "parse_node_id", "prune", "save", "union", "validate"]
