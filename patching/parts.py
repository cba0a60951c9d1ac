"""Prompt batches: the engine processes a task ``prompt_batch`` prompts at a time, so its memory is bounded by
the prompt batch, not by the task.

A :class:`Part` holds what the engine keeps for one prompt batch between runs: the prompts (trimmed to the
longest prompt of the batch: right padding after every ``pos`` is never read), the clean next-token logits,
the clean and ablated activations of every sender group, the metric (a KL metric is relative to this
batch's own clean logits), and for the suffix runners the recorded clean forward
(:class:`patching.replay.Replay`). Exact patching runs each mask on every part and concatenates the
per-prompt metric (so a batch mean is the mean over all prompts); attribution sums each part's
``gradient . difference`` and divides by the total number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor

from patching.batch import TaskBatch
from patching.metrics import Metric


@dataclass(eq=False)
class Part:
    """One prompt batch of an engine call (module docstring); ``rows`` are its rows in the whole batch."""

    rows: slice
    batch: TaskBatch
    clean_logits: Float[Tensor, "b V"]
    clean_units: dict[str, Tensor]
    abl_units: dict[str, Tensor] = field(default_factory=dict)
    replay: Any = None
    runner: Any = None
    metric_fn: Metric | None = None
    clean_metric: Float[Tensor, " b"] | None = None
    points: dict[Any, Tensor] = field(default_factory=dict)  # subclass captures on the clean forward (edges: the
    #                                                          residual stream at each receiver input)
    cache: dict[Any, Any] = field(default_factory=dict)      # what a patcher derives from them, per prompt batch

    @property
    def B(self) -> int:
        return int(self.batch.clean.shape[0])

    @property
    def P(self) -> int:
        return int(self.batch.clean.shape[1])


def prompt_slices(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``n`` rows (one slice when ``size`` is None)."""
    if n == 0:
        return [slice(0, 0)]
    size = n if size is None else max(1, min(size, n))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_prompt_batch(prompt_batch: int | None, where: str) -> None:
    if prompt_batch is not None and (not isinstance(prompt_batch, int) or prompt_batch < 1):
        raise ValueError(f"{where}: prompt_batch must be a positive integer or None, got {prompt_batch!r}")


__all__ = ["Part", "prompt_slices", "check_prompt_batch"]
