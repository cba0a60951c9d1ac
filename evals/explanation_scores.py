"""The math of explanation scores, computed from saved scorer records (so anyone can recompute them).

A scorer (``explainers.scoring``) writes a :class:`~explainers.scoring.base.ScorerOutput`: flat ``predicted``
and ``actual`` values over the held-out records (concatenated) and the name of its ``metric``:

- ``pearson`` (simulation, tokens, rule; Bills et al. 2023): Pearson's correlation between simulated and true
  activations over all tokens of all held-out records concatenated. ``None`` (never 0) when undefined:
  fewer than two values or a constant input.
- ``balanced_accuracy`` (detection, fuzzing; Paulo et al. 2024): (TPR + TNR) / 2 of the 0/1 predictions
  against the 0/1 labels; ``None`` when a class is absent from the labels.
- ``auc`` (embedding; delphi's embedding scorer): the area under the ROC curve of the predicted similarities
  against the 0/1 labels (Mann-Whitney U / (n_pos n_neg), ties 1/2); ``None`` when a class is absent.

All sums run in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("pearson", "balanced_accuracy", "auc")


def _arrays(predicted: Sequence[float], actual: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predicted, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if p.shape != a.shape:
        raise ValueError(f"{p.size} predictions for {a.size} actual values")
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        raise ValueError("predictions and actual values must be finite")
    return p, a


def pearson(predicted: Sequence[float], actual: Sequence[float]) -> float | None:
    """Pearson's r; ``None`` for fewer than 2 values or when either side is constant."""
    p, a = _arrays(predicted, actual)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(a) == 0:
        return None
    p, a = p - p.mean(), a - a.mean()
    sp, sa = float(np.sqrt((p * p).sum())), float(np.sqrt((a * a).sum()))
    return float(np.clip((p * a).sum() / (sp * sa), -1.0, 1.0))


def _labels(actual: np.ndarray) -> np.ndarray:
    if not np.isin(actual, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return actual.astype(bool)


def balanced_accuracy(predicted: Sequence[float], actual: Sequence[float]) -> float | None:
    """Mean of the true-positive and true-negative rates of 0/1 predictions; ``None`` without both classes."""
    p, a = _arrays(predicted, actual)
    y, yhat = _labels(a), _labels(p)
    if y.all() or not y.any():
        return None
    tpr = float((yhat & y).sum() / y.sum())
    tnr = float((~yhat & ~y).sum() / (~y).sum())
    return (tpr + tnr) / 2


def roc_auc(predicted: Sequence[float], actual: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative) + 1/2 P(tie); ``None`` without both classes."""
    p, a = _arrays(predicted, actual)
    y = _labels(a)
    pos, neg = p[y], p[~y]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


_FUNCTIONS = {"pearson": pearson, "balanced_accuracy": balanced_accuracy, "auc": roc_auc}


def compute(metric: str, predicted: Sequence[float], actual: Sequence[float]) -> float | None:
    if metric not in _FUNCTIONS:
        raise ValueError(f"unknown explanation metric {metric!r}; known: {', '.join(METRICS)}")
    return _FUNCTIONS[metric](predicted, actual)


def score_record(output: Mapping[str, Any]) -> float | None:
    """The score of one saved scorer record (``ScorerOutput.to_dict()``): ``None`` when the scorer failed
    or the metric is undefined."""
    if output.get("failed"):
        return None
    return compute(output["metric"], output["predicted"], output["actual"])


def bootstrap_interval(metric: str, predicted: Sequence[float], actual: Sequence[float],
                       lengths: Sequence[int], *, n: int = 1000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a score, resampling whole records (``lengths`` values each);
    ``None`` when fewer than half of the resamples give a defined score."""
    p, a = _arrays(predicted, actual)
    lengths = [int(n_) for n_ in lengths]
    if sum(lengths) != p.size:
        raise ValueError(f"record lengths sum to {sum(lengths)}, not {p.size}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(lengths), len(lengths))
        idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in pick])
        v = compute(metric, p[idx], a[idx])
        if v is not None:
            values.append(v)
    if len(values) < n / 2:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
