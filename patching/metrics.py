"""Task metrics: functions of the next-token logits at the prediction position.

Every metric has the signature ``metric(logits, batch) -> values`` with ``logits`` of shape
``[..., B, V]`` (already gathered at ``batch.pos``; leading dimensions index ablations) and values of
shape ``[..., B]``. Higher is better for every metric except ``kl``, which is a divergence from the
clean run (0 is best). Build one by name with :func:`get_metric`.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor

from patching.batch import TaskBatch

Metric = Callable[[Float[Tensor, "... B V"], TaskBatch], Float[Tensor, "... B"]]


def _pick(logits: Tensor, tokens: Tensor) -> Tensor:
    idx = tokens.expand(*logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, idx).squeeze(-1)


def logit_diff(logits: Float[Tensor, "... B V"], batch: TaskBatch) -> Float[Tensor, "... B"]:
    """logit(answer) - logit(wrong)."""
    return _pick(logits, batch.answer) - _pick(logits, batch.wrong)


def prob_diff(logits: Float[Tensor, "... B V"], batch: TaskBatch) -> Float[Tensor, "... B"]:
    """p(answer) - p(wrong)."""
    probs = logits.softmax(-1)
    return _pick(probs, batch.answer) - _pick(probs, batch.wrong)


def accuracy(logits: Float[Tensor, "... B V"], batch: TaskBatch) -> Float[Tensor, "... B"]:
    """1.0 where the answer is the arg-max token, else 0.0."""
    return (logits.argmax(-1) == batch.answer).to(logits.dtype)


class KLToClean:
    """KL(clean || patched) of the next-token distributions; 0 on the clean run itself.

    Needs the clean logits ``[B, V]`` at construction (the engine computes them once).
    """

    def __init__(self, clean_logits: Float[Tensor, "B V"]):
        self.clean_logprobs = clean_logits.log_softmax(-1)

    def __call__(self, logits: Float[Tensor, "... B V"], batch: TaskBatch) -> Float[Tensor, "... B"]:
        lp = logits.log_softmax(-1)
        ref = self.clean_logprobs.to(lp.dtype)
        return (ref.exp() * (ref - lp)).sum(-1)


METRICS: dict[str, Callable[..., Metric]] = {
    "logit_diff": lambda clean_logits=None: logit_diff,
    "prob_diff": lambda clean_logits=None: prob_diff,
    "accuracy": lambda clean_logits=None: accuracy,
    "kl": lambda clean_logits=None: KLToClean(clean_logits),
}
HIGHER_IS_BETTER = {"logit_diff": True, "prob_diff": True, "accuracy": True, "kl": False}


def get_metric(name: str, clean_logits: Tensor | None = None) -> Metric:
    """The metric called ``name``; ``kl`` needs ``clean_logits`` ``[B, V]``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    if name == "kl" and clean_logits is None:
        raise ValueError("metric 'kl' needs the clean logits at the prediction position")
    return METRICS[name](clean_logits=clean_logits)


def gather_pos(logits: Float[Tensor, "... B P V"], pos: Tensor) -> Float[Tensor, "... B V"]:
    """Logits at each row's prediction position."""
    idx = pos.view(*([1] * (logits.dim() - 3)), -1, 1, 1).expand(*logits.shape[:-2], 1, logits.shape[-1])
    return logits.gather(-2, idx).squeeze(-2)


__all__ = ["Metric", "logit_diff", "prob_diff", "accuracy", "KLToClean", "get_metric", "gather_pos",
           "METRICS", "HIGHER_IS_BETTER"]
