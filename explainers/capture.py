"""Read activations at some hooks of a TransformerBridge, stopping the forward pass once all have fired.

:func:`capture` runs the model on a token batch with forward hooks that copy the activations at the requested
hooks and, once every one of them has fired, raise an internal exception that ends the forward pass there: the
layers after the last needed hook, the final norm and the unembedding are never computed (what makes the
activation store cheaper than a plain forward). Works on every bridge whose hooks fire in forward order
(transformers, Mamba); hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


class _Stop(Exception):
    """Raised inside the last needed hook to end the forward pass early."""


def check_hooks(model: Any, hooks: Sequence[str]) -> None:
    """One-line ``ValueError`` for a hook the model lacks (listing a few it has at that depth)."""
    for h in hooks:
        if h not in model.hook_dict:
            prefix = ".".join(h.split(".")[:2]) + "."
            near = [n for n in model.hook_dict if n.startswith(prefix)][:8]
            raise ValueError(f"the model has no hook {h!r}" + (f" (hooks there: {', '.join(near)})" if near else ""))


@torch.no_grad()
def capture(model: Any, hooks: Sequence[str], tokens: Int[Tensor, "B P"], *,
            stop_early: bool = True) -> dict[str, Float[Tensor, "B P ..."]]:
    """Activations at ``hooks`` for ``tokens`` (``{hook: tensor}``, on the model's device, detached).

    With ``stop_early`` the forward pass ends as soon as every hook has fired (module docstring).
    """
    hooks = list(dict.fromkeys(hooks))
    check_hooks(model, hooks)
    out: dict[str, Tensor] = {}

    def keep(name: str):
        def fn(x: Tensor, hook: Any) -> None:
            out[name] = x.detach()
            if stop_early and len(out) == len(hooks):
                raise _Stop
        return fn

    with model.hooks(fwd_hooks=[(h, keep(h)) for h in hooks]):
        try:
            model(tokens)
        except _Stop:
            pass
    missing = [h for h in hooks if h not in out]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire in a forward pass of this model")
    return out
