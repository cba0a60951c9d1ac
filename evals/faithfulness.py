"""Faithfulness curves, CPR and CMD: the circuit-localisation protocol of MIB (Mueller et al. 2025,
"MIB: A Mechanistic Interpretability Benchmark", circuit track).

Faithfulness of a circuit ``C`` on a task metric ``m`` (mean over prompts), as everywhere in the project
(:mod:`patching.faithfulness`)::

    f(C) = (m(C) - m(empty)) / (m(full model) - m(empty))

where ``m(C)`` is the metric with every edge outside ``C`` ablated (engine edge semantics, see
docs/architecture.md), ``empty`` ablates every edge and ``full`` none; so ``f(full) = 1`` and
``f(empty) = 0``. A method's ranking defines circuits at sizes ``p`` = 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50,
100 % of the graph's edges (:data:`MIB_PERCENTAGES`).

Sizes: ``k(p) = floor(p / 100 * E)`` edges, MIB's ``int(pct * n_edges)``. The circuit at size k
(``FaithfulnessConfig.circuits``): ``connected`` (default) is the connected circuit of at most k edges
that ``discover --topk k`` keeps (:func:`circuits.algorithms.select.connected_prefixes`: the longest prefix of
the ranking whose input -> logits connected part has at most k edges; MIB also prunes its circuits to
connected ones); ``topk`` is the literal top k edges, connected or not. With few edges the small sizes
round to 0 edges: those points are the empty circuit (``f = 0`` up to float error) and stay in the curve,
as in MIB; the edges actually in each circuit are reported (``Curve.edges``).

Ranking: ``abs`` (default) ranks edges by ``|score|``; ``signed`` by the signed contribution to the metric
(``-score`` for a higher-is-better scoring metric, since scores are ``m(ablated) - m(clean)``; ``+score``
for ``kl``). Ties go to the lower edge index. MIB ranks its CPR circuits by signed and its CMD circuits by
absolute scores when a method provides both; here one ranking serves both numbers (choose it per run).

Integration, exactly as MIB's ``evaluate_area_under_curve`` (hannamw/MIB-circuit-track,
``MIB_circuit_track/evaluation.py``, with its default ``log_scale=False``): with ``x_i = p_i / 100`` (the
fraction of edges, 0.001 ... 1) and ``f_i`` the faithfulness at size ``i``, trapezoids between
consecutive sizes on a *linear* x axis, not normalised by the x range (0.999)::

    CPR = sum_i (x_{i+1} - x_i) * (f_i + f_{i+1}) / 2
    CMD = sum_i (x_{i+1} - x_i) * (|1 - f_i| + |1 - f_{i+1}|) / 2

Higher CPR and lower CMD are better. The sizes are log-spaced but the integral is over linear ``x``, so the
interval 50-100 % carries half of the weight and 0.1-10 % about 10 %. ``log_x=True`` integrates over
``ln x`` instead (MIB's ``log_scale=True``; also unnormalised).

KL: alongside, the mean KL(full model || circuit) of the next-token distributions at each size.

Random baseline: for each of ``random_seeds`` seeds (``seed``, ``seed + 1``, ...) a random permutation of
the edges is a ranking, and its circuits are built the same way (connected or literal top-k). Its curve is
the mean faithfulness / KL over seeds; its CPR and CMD are the means of the per-seed CPR and CMD.

Everything runs through ONE ``EdgePatcher``: the full model, the empty circuit, every method's sizes and
every random circuit are rows of one ablation mask ``[K, E]`` evaluated with ``run_logits`` (K masks per
forward; ``masks_per_call`` bounds memory). Identical masks (the 100 % circuit and the full model, a random
connected circuit that is empty at small sizes, ...) are run once: on a 120-thousand-edge model each mask is
seconds of exact patching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

MIB_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
RANKINGS = ("abs", "signed")
CIRCUITS = ("connected", "topk")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """Settings of a faithfulness-curve evaluation (module docstring).

    Attributes:
        percentages: circuit sizes in % of the graph's edges, increasing.
        ranking: ``abs`` or ``signed`` ranking of the scores.
        random_seeds: random circuits per size for the baseline (0: no baseline).
        seed: first seed of the random circuits.
        log_x: integrate over ``ln(fraction)`` instead of the fraction (MIB default: False).
        masks_per_call: most masks per ``run_logits`` call (``None``: all at once).
        circuits: ``connected`` (the circuit ``discover --topk k`` keeps) or ``topk`` (the literal top k).
    """

    percentages: tuple[float, ...] = MIB_PERCENTAGES
    ranking: str = "abs"
    random_seeds: int = 5
    seed: int = 0
    log_x: bool = False
    masks_per_call: int | None = None
    circuits: str = "connected"

    def __post_init__(self) -> None:
        p = tuple(float(x) for x in self.percentages)
        if len(p) < 2 or any(not (0 < x <= 100) for x in p) or any(b <= a for a, b in zip(p, p[1:], strict=False)):
            raise ValueError(f"FaithfulnessConfig.percentages must be >= 2 increasing values in (0, 100], got {p}")
        object.__setattr__(self, "percentages", p)
        if self.ranking not in RANKINGS:
            raise ValueError(f"FaithfulnessConfig.ranking: unknown ranking {self.ranking!r}; choose one of {RANKINGS}")
        if self.random_seeds < 0:
            raise ValueError(f"FaithfulnessConfig.random_seeds must be >= 0, got {self.random_seeds}")
        if self.masks_per_call is not None and self.masks_per_call < 1:
            raise ValueError(f"FaithfulnessConfig.masks_per_call must be >= 1, got {self.masks_per_call}")
        if self.circuits not in CIRCUITS:
            raise ValueError(f"FaithfulnessConfig.circuits: unknown {self.circuits!r}; choose one of {CIRCUITS}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentages"] = list(self.percentages)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaithfulnessConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"FaithfulnessConfig.from_dict: unknown field(s) {unknown}")
        d = dict(d)
        if "percentages" in d:
            d["percentages"] = tuple(d["percentages"])
        return cls(**d)


def edge_counts(percentages: Sequence[float], n_edges: int) -> list[int]:
    """``floor(p / 100 * n_edges)`` per size (MIB's ``int(pct * n)``), computed exactly for ``p`` given
    with up to 6 decimals so that e.g. 100 % is always ``n_edges``."""
    return [int(round(p * 1_000_000)) * n_edges // 100_000_000 for p in percentages]


def area_under_curve(percentages: Sequence[float], values: Sequence[float], *, log_x: bool = False) -> float:
    """MIB's trapezoid area: ``sum (x_{i+1} - x_i) (y_i + y_{i+1}) / 2`` with ``x = p / 100`` (or ``ln x``)."""
    if len(percentages) != len(values) or len(values) < 2:
        raise ValueError(f"area_under_curve: need >= 2 points and as many sizes as values "
                         f"(got {len(percentages)} sizes, {len(values)} values)")
    xs = [p / 100.0 for p in percentages]
    if log_x:
        xs = [math.log(x) for x in xs]
    return float(sum((x2 - x1) * (y1 + y2) / 2.0
                     for x1, x2, y1, y2 in zip(xs, xs[1:], values, values[1:], strict=False)))


def cpr(percentages: Sequence[float], faithfulness: Sequence[float], *, log_x: bool = False) -> float:
    """Circuit performance ratio: area under the faithfulness curve (higher is better)."""
    return area_under_curve(percentages, faithfulness, log_x=log_x)


def cmd(percentages: Sequence[float], faithfulness: Sequence[float], *, log_x: bool = False) -> float:
    """Circuit-model distance: area under ``|1 - f|`` (lower is better)."""
    return area_under_curve(percentages, [abs(1.0 - f) for f in faithfulness], log_x=log_x)


def ranking_keys(values: Float[Tensor, " E"], *, ranking: str = "abs", higher_is_better: bool = True) -> \
        Float[Tensor, " E"]:
    """Importance of each edge (larger = kept first) from engine scores ``m(ablated) - m(clean)``.

    ``abs``: ``|score|``; ``signed``: ``-score`` (``+score`` when the scoring metric is lower-is-better).
    NaN scores get ``-inf``.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    v = values.detach().double().cpu()
    key = v.abs() if ranking == "abs" else (-v if higher_is_better else v)
    return torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)


def top_masks(importance: Float[Tensor, " E"], counts: Sequence[int]) -> Bool[Tensor, "K E"]:
    """In-circuit masks of the ``k`` most important edges for each ``k`` in ``counts`` (ties: lower index)."""
    n = importance.shape[0]
    order = torch.sort(-importance.double().cpu(), stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    return rank.unsqueeze(0) < torch.tensor(list(counts), dtype=torch.long).unsqueeze(1)


def random_masks(n_edges: int, counts: Sequence[int], seeds: Sequence[int]) -> Bool[Tensor, "S K E"]:
    """Nested random in-circuit masks: per seed, the first ``k`` edges of a seeded random permutation."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(top_masks(torch.rand(n_edges, generator=g, dtype=torch.float64), counts))
    return torch.stack(out) if out else torch.zeros(0, len(counts), n_edges, dtype=torch.bool)


def evaluate_masks(patcher: Any, batch: Any, in_circuit: Bool[Tensor, "K E"], metric: str, *,
                   masks_per_call: int | None = None) -> dict[str, Float[Tensor, " K"]]:
    """Mean task metric, mean KL to the full model, and faithfulness of each circuit.

    Two reference rows (nothing ablated, everything ablated) are evaluated in the same calls. Returns
    ``{"metric", "kl", "faithfulness"}`` (``[K]`` float64 each) and the scalars ``m_full``, ``m_empty``,
    ``kl_empty``. Raises :class:`patching.faithfulness.FaithfulnessUndefined` (a ``ValueError``) when
    ``m_full == m_empty``.
    """
    from patching.faithfulness import faithfulness
    from patching.metrics import KLToClean, get_metric

    own = getattr(patcher, "batch", None)  # the engine's copy of the batch, on the model's device
    if own is not None:
        if tuple(own.clean.shape) != tuple(batch.clean.shape):
            raise ValueError(f"evaluate_masks: batch {tuple(batch.clean.shape)} is not the patcher's batch "
                             f"{tuple(own.clean.shape)}")
        batch = own
    n_edges = in_circuit.shape[1]
    ablate = torch.cat([torch.zeros(1, n_edges, dtype=torch.bool), torch.ones(1, n_edges, dtype=torch.bool),
                        ~in_circuit.cpu()])
    dev = getattr(batch, "device", torch.device("cpu"))
    distinct, inverse = torch.unique(ablate, dim=0, return_inverse=True)  # each distinct mask is run once
    step = masks_per_call or distinct.shape[0]
    chunks = []
    with torch.no_grad():
        for i in range(0, distinct.shape[0], step):
            chunks.append(patcher.run_logits(distinct[i:i + step].to(dev)).double())
    logits = torch.cat(chunks)[inverse.to(chunks[0].device)]  # [2 + K, B, V]
    m = get_metric(metric, clean_logits=logits[0])(logits, batch).mean(-1).cpu()
    kl = KLToClean(logits[0])(logits, batch).mean(-1).cpu()
    m_full, m_empty = float(m[0]), float(m[1])
    return {"metric": m[2:], "kl": kl[2:], "faithfulness": faithfulness(m[2:], m_full, m_empty, metric=metric),
            "m_full": torch.tensor(m_full), "m_empty": torch.tensor(m_empty), "kl_empty": kl[1]}


@dataclass(frozen=True)
class Curve:
    """One faithfulness curve. For the random baseline the lists are means over seeds and ``*_std`` their
    standard deviations; ``cpr`` / ``cmd`` are the means of the per-seed areas."""

    label: str
    faithfulness: tuple[float, ...]
    kl: tuple[float, ...]
    metric: tuple[float, ...]
    cpr: float
    cmd: float
    faithfulness_std: tuple[float, ...] = ()
    cpr_std: float | None = None
    cmd_std: float | None = None
    edges: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FaithfulnessResult:
    """Curves of several methods and the random baseline over the same sizes."""

    config: FaithfulnessConfig
    metric: str
    n_edges: int
    counts: tuple[int, ...]
    m_full: float
    m_empty: float
    kl_empty: float
    curves: dict[str, Curve]
    random: Curve | None = None
    forward_passes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "metric": self.metric, "n_edges": self.n_edges,
                "percentages": list(self.config.percentages), "counts": list(self.counts), "m_full": self.m_full,
                "m_empty": self.m_empty, "kl_empty": self.kl_empty, "forward_passes": self.forward_passes,
                "curves": {k: c.to_dict() for k, c in self.curves.items()},
                "random": self.random.to_dict() if self.random else None, **self.extra}


def circuit_masks(graph: Any, importance: Float[Tensor, " E"], counts: Sequence[int], kind: str = "connected",
                  conn: Any = None) -> Bool[Tensor, "K E"]:
    """In-circuit masks of the circuit at each size: ``connected`` (what ``discover --topk k`` keeps) or the
    literal ``topk`` (module docstring). ``graph`` may be ``None`` for ``topk``."""
    if kind == "topk":
        return top_masks(importance, counts)
    from circuits.algorithms.select import connected_prefixes

    return connected_prefixes(graph, importance, list(counts), conn)


def faithfulness_curves(patcher: Any, batch: Any, importance: Mapping[str, Float[Tensor, " E"]], *, metric: str,
                        config: FaithfulnessConfig | None = None, graph: Any = None) -> FaithfulnessResult:
    """Faithfulness / KL curves, CPR and CMD of every method in ``importance`` and of the random baseline.

    Args:
        patcher: an ``EdgePatcher`` over the model's graph and ``batch`` (one for all methods).
        batch: the TaskBatch the patcher was built on (the metric reads its answers).
        importance: per method, ``[E]`` edge importances aligned with the graph's edges (larger = kept
            first; see :func:`ranking_keys` and :func:`evals.run.edge_importance`).
        metric: the task metric name (``logit_diff``, ``prob_diff``, ``accuracy``, ``kl``).
        config: sizes, ranking, random seeds, circuit construction.
        graph: the ComponentGraph (default: the patcher's), for connected circuits.
    """
    config = config or FaithfulnessConfig()
    graph = graph if graph is not None else getattr(patcher, "graph", None)
    n_edges = next(iter(importance.values())).shape[0] if importance else len(patcher.graph.edges)
    for name, imp in importance.items():
        if imp.shape != (n_edges,):
            raise ValueError(f"faithfulness_curves: importance of {name!r} has shape {tuple(imp.shape)}, "
                             f"expected ({n_edges},)")
    counts = edge_counts(config.percentages, n_edges)
    names = list(importance)
    seeds = [config.seed + i for i in range(config.random_seeds)]
    conn = None
    if config.circuits == "connected":
        from circuits.algorithms.select import Connectivity

        conn = Connectivity(graph)
    masks = [circuit_masks(graph, importance[n], counts, config.circuits, conn) for n in names]
    rnd = torch.stack([circuit_masks(graph, torch.rand(n_edges, generator=torch.Generator().manual_seed(int(s)),
                                                       dtype=torch.float64), counts, config.circuits, conn)
                       for s in seeds]) if seeds else torch.zeros(0, len(counts), n_edges, dtype=torch.bool)
    all_masks = torch.cat(masks + [rnd.reshape(-1, n_edges)]) if (masks or seeds) else \
        torch.zeros(0, n_edges, dtype=torch.bool)
    passes0 = int(getattr(patcher, "forward_passes", 0))
    ev = evaluate_masks(patcher, batch, all_masks, metric, masks_per_call=config.masks_per_call)
    k = len(counts)
    pct, lx = config.percentages, config.log_x

    def rows(t: Tensor, i: int) -> tuple[float, ...]:
        return tuple(float(v) for v in t[i * k:(i + 1) * k])

    curves = {}
    for i, n in enumerate(names):
        f = rows(ev["faithfulness"], i)
        curves[n] = Curve(label=n, faithfulness=f, kl=rows(ev["kl"], i), metric=rows(ev["metric"], i),
                          cpr=cpr(pct, f, log_x=lx), cmd=cmd(pct, f, log_x=lx),
                          edges=tuple(float(x) for x in masks[i].sum(1).tolist()))
    random_curve = None
    if seeds:
        base = len(names) * k
        f_r = ev["faithfulness"][base:].reshape(len(seeds), k)
        kl_r = ev["kl"][base:].reshape(len(seeds), k)
        m_r = ev["metric"][base:].reshape(len(seeds), k)
        cprs = torch.tensor([cpr(pct, f.tolist(), log_x=lx) for f in f_r], dtype=torch.float64)
        cmds = torch.tensor([cmd(pct, f.tolist(), log_x=lx) for f in f_r], dtype=torch.float64)
        std = (lambda t: t.std(0, unbiased=False)) if len(seeds) > 1 else (lambda t: torch.zeros_like(t[0]))
        random_curve = Curve(label="random", faithfulness=tuple(f_r.mean(0).tolist()), kl=tuple(kl_r.mean(0).tolist()),
                             metric=tuple(m_r.mean(0).tolist()), cpr=float(cprs.mean()), cmd=float(cmds.mean()),
                             faithfulness_std=tuple(std(f_r).tolist()), cpr_std=float(std(cprs)),
                             cmd_std=float(std(cmds)), edges=tuple(rnd.sum(2).double().mean(0).tolist()))
    return FaithfulnessResult(config=config, metric=metric, n_edges=n_edges, counts=tuple(counts),
                              m_full=float(ev["m_full"]), m_empty=float(ev["m_empty"]), kl_empty=float(ev["kl_empty"]),
                              curves=curves, random=random_curve,
                              forward_passes=int(getattr(patcher, "forward_passes", 0)) - passes0)


__all__ = ["MIB_PERCENTAGES", "FaithfulnessConfig", "Curve", "FaithfulnessResult", "edge_counts",
           "area_under_curve", "cpr", "cmd", "ranking_keys", "top_masks", "random_masks", "evaluate_masks",
           "faithfulness_curves", "circuit_masks", "CIRCUITS"]
