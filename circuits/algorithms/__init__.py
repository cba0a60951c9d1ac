"""Circuit discovery algorithms behind one registry.

``ALGORITHMS[name]`` is an :class:`~circuits.algorithms.base.Algorithm`, callable as
``(model, graph: ComponentGraph, batch: TaskBatch, config: DiscoveryConfig) -> DiscoveryResult``.
One file per algorithm: ``acdc`` (ACDC), ``attribution`` (``eap``, ``eap-ig``), ``greedy`` (greedy edge
pruning to a faithfulness target), ``nodes`` (``node-patch``, ``node-atp``). Register a new one with
``@register("name", ...)``.
"""

from circuits.algorithms import acdc as _acdc  # noqa: F401  (registers "acdc")
from circuits.algorithms import attribution as _attribution  # noqa: F401  ("eap", "eap-ig")
from circuits.algorithms import greedy as _greedy  # noqa: F401  ("greedy")
from circuits.algorithms import nodes as _nodes  # noqa: F401  ("node-patch", "node-atp")
from circuits.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    DiscoveryConfig,
    DiscoveryResult,
    get_algorithm,
    register,
    resolve_config,
)
from circuits.algorithms.select import prune_to_connected, select_units

__all__ = ["ALGORITHMS", "Algorithm", "DiscoveryConfig", "DiscoveryResult", "get_algorithm", "register",
           "resolve_config", "prune_to_connected", "select_units"]
