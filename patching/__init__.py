"""The activation / attribution patching engine over TransformerLens 4 bridges.

Public API (docs/architecture.md): :class:`ComponentGraph`, :class:`Node`, :class:`Edge`,
:class:`Scores`, :class:`EdgePatcher`, :class:`NodePatcher`, :func:`node_patching_scores`,
:func:`edge_patching_scores`, :func:`atp`, :func:`eap`, :func:`eap_ig`.
"""

from patching.attribution import atp, eap, eap_ig
from patching.batch import TaskBatch
from patching.exact import EdgePatcher, NodePatcher, edge_patching_scores, node_patching_scores
from patching.graph import ComponentGraph, Edge, Node
from patching.scores import Scores

__all__ = ["ComponentGraph", "Node", "Edge", "Scores", "EdgePatcher", "NodePatcher", "node_patching_scores",
           "edge_patching_scores", "atp", "eap", "eap_ig", "TaskBatch"]
