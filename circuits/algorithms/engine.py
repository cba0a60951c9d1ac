"""How the algorithms call the engine: the options every engine call takes from the config, and the EAP-IG
warm start that ACDC and greedy share.

Options are passed only when the config sets them (``prompt_batch``, ``qk_fix``), so an engine default is
never overridden silently; an option the installed engine does not accept is a one-line error naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.algorithms.base import DiscoveryConfig


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def engine_kwargs(fn: Callable[..., Any], what: str, **opts: Any) -> dict[str, Any]:
    """The options that are set (not ``None`` / ``False``), checked to be parameters of ``fn``."""
    out = {k: v for k, v in opts.items() if v is not None and v is not False}
    for k in out:
        if not _accepts(fn, k):
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag}: the engine's {what} does not take {k!r} (patching/ is older than this option)")
    return out


def patcher_options(cls: Callable[..., Any], config: DiscoveryConfig) -> dict[str, Any]:
    """Keyword arguments for an ``EdgePatcher`` / ``NodePatcher`` / ``*_patching_scores`` call."""
    return engine_kwargs(cls, getattr(cls, "__name__", "patcher"), prompt_batch=config.prompt_batch)


def attribution_options(fn: Callable[..., Any], config: DiscoveryConfig) -> dict[str, Any]:
    """Keyword arguments for ``atp`` / ``eap`` / ``eap_ig``: the prompt batch and AtP*'s QK fix."""
    return engine_kwargs(fn, getattr(fn, "__name__", "attribution"), prompt_batch=config.prompt_batch,
                    qk_fix=config.qk_fix)


def warm_start_scores(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> Any:
    """EAP-IG edge scores for a warm start, on ``config.warm_start_metric`` (see ``resolve_config``)."""
    from patching.attribution import eap_ig

    metric = config.warm_start_metric or config.metric or "logit_diff"
    return eap_ig(model, graph, batch, ablation=config.ablation, metric=metric, steps=config.ig_steps,
                  per_position=config.per_position, **attribution_options(eap_ig, config))


def top_edges(scores: Tensor, n: int) -> Bool[Tensor, " E"]:
    """The ``n`` edges of largest ``|score|`` (ties: lower index; NaN last)."""
    s = scores.detach().double().cpu().abs()
    key = torch.where(torch.isnan(s), torch.full_like(s, -1.0), s)
    order = torch.sort(key, descending=True, stable=True).indices
    out = torch.zeros(len(s), dtype=torch.bool)
    out[order[:n]] = True
    return out


__all__ = ["engine_kwargs", "patcher_options", "attribution_options", "warm_start_scores", "top_edges"]
