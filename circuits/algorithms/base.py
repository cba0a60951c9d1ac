"""Shared types of the discovery algorithms: the config, the result, and the registry.

Every algorithm has one signature::

    algorithm(model, graph: ComponentGraph, batch: TaskBatch, config: DiscoveryConfig) -> DiscoveryResult

and registers itself under a method name with :func:`register`. ``DiscoveryResult.kept`` is a boolean
mask over the scored units (edges, nodes or neurons, aligned with ``scores.ids``); ``circuits.convert``
turns it into a CircuitGraph and ``circuits.discover`` measures its faithfulness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

ABLATIONS = ("resample", "mean", "zero")
LEVELS = ("edge", "node", "neuron")
# Fields that steer how a run is carried out (progress bar, checkpoint file) but not its result:
# they are left out of the provenance so that the same discovery gives the same graph.
RUN_CONTROL_FIELDS = ("progress", "checkpoint", "resume", "chunk_size", "prompt_batch")
# Metrics that measure a distance to the clean run (0 there, lower is better): their gradient vanishes at the
# clean run, and ACDC compares signed changes of them (a removal that lowers the distance is always accepted).
DIVERGENCE_METRICS = ("kl", "l2")
# How a result ranks its units for curves and ROC (DiscoveryResult.ranking_kind):
RANKING_KINDS = {
    "abs-score": "|score|: each unit's own (estimated) effect m(ablated) - m(clean)",
    "removal-order": "order of removal by greedy elimination (last removed = most important), continued past "
                     "the target to the empty circuit; edges outside the warm start by EAP-IG |score| below",
    "acdc-tau": "ACDC tau sweep: the largest tau whose ACDC circuit keeps the edge (ties: the number of taus "
                "keeping it)",
    "in-circuit": "ACDC single run: the kept edges first (by |effect when tried|), then the removed ones",
}


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of one discovery run (shared by every algorithm; each reads the fields it needs).

    Attributes:
        ablation: how an ablated unit's output is replaced: ``resample`` (the corrupted prompt's
            activation), ``mean`` (mean over the clean batch) or ``zero``.
        metric: the metric the algorithm scores with: ``kl`` (KL divergence to the clean model) or a task
            metric (``logit_diff``, ``prob_diff``, ``accuracy``). ``None``: the method's default
            (``kl`` for ACDC, the task's metric for the others; :func:`circuits.discover.discover`
            fills it in).
        level: ``edge``, ``node`` or ``neuron``. ``None``: the method's first supported level.
        threshold: ACDC's tau (an edge is removed when ablating it changes the metric by less than
            tau), or for the scoring methods the minimum ``|score|`` of a kept unit.
        topk: keep the ``topk`` units of largest ``|score|`` (scoring methods only).
        topk_fraction: keep this fraction (0-1] of the units of largest ``|score|``.
        faithfulness_target: scoring methods given none of threshold / topk / topk_fraction keep the
            smallest top-k circuit whose faithfulness reaches this (see ``circuits.algorithms.budget``).
        ig_steps: integration steps of EAP-IG.
        n_prompts: prompts generated when the task is given by name.
        seed: seed of task generation and of every random choice (a rerun gives the same result).
        per_position: mean ablation per token position instead of over all positions.
        window: ACDC's largest speculation window: the most sequential decisions one batched forward tries.
        call_overhead: ACDC's estimate of the cost of one engine call, in units of the cost of one
            ablation mask; it sets how far ACDC speculates. ``None``: 0.5 on a CPU (compute grows with
            the masks), 20 on a GPU (a call of many masks costs little more than one).
        chunk_size: most masks per engine forward (memory budget); ``None``: the engine's default.
        progress: show a tqdm progress bar (on stderr).
        checkpoint: ACDC only: a JSON file the current state is written to after every receiver.
        resume: ACDC only: continue from ``checkpoint`` when it exists.
        warm_start: ACDC and greedy: only the ``warm_start`` edges of largest EAP-IG ``|score|`` are
            candidates (ACDC removes every other edge up front; greedy starts from their connected circuit).
        warm_start_fraction: the same as a fraction (0-1] of the edges.
        warm_start_metric: the metric the warm start's EAP-IG scores with (``None``: filled in by
            :func:`resolve_config`: the task's metric for ACDC, whose own metric is a divergence with no
            gradient at the clean run; the method's metric for greedy).
        qk_fix: attribution methods (EAP, EAP-IG, AtP and the warm starts): AtP*'s QK fix (Kramar et al.
            2024): attention patterns of q/k edges are recomputed instead of linearising the softmax.
        prompt_batch: prompts per engine forward / backward (memory is bounded by the batch, not the task;
            attribution sums over prompt batches, exact patching averages over them). ``None``: all at once.
        full_ranking: greedy: continue the elimination past the target down to the empty circuit so that
            every edge of the start circuit gets a rank by removal order (``eval circuits`` sets it; the
            circuit returned is the one at the target either way).
        multi_removal: greedy: remove as many of the least harmful edges per step as jointly keep the target
            (1, 2, 4, ... measured) instead of one: about log |C| steps instead of |C|, for large graphs; the
            circuit still reaches the target and is locally minimal, but need not be one-at-a-time's.
    """

    ablation: str = "resample"
    metric: str | None = None
    level: str | None = None
    threshold: float | None = None
    topk: int | None = None
    topk_fraction: float | None = None
    faithfulness_target: float = 0.8
    ig_steps: int = 5
    n_prompts: int = 32
    seed: int = 0
    per_position: bool = False
    window: int = 64
    call_overhead: float | None = None
    chunk_size: int | None = None
    progress: bool = False
    checkpoint: str | None = None
    resume: bool = False
    warm_start: int | None = None
    warm_start_fraction: float | None = None
    warm_start_metric: str | None = None
    qk_fix: bool = False
    prompt_batch: int | None = None
    full_ranking: bool = False
    multi_removal: bool = False

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"DiscoveryConfig.ablation: unknown ablation {self.ablation!r}; choose one of {ABLATIONS}")
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"DiscoveryConfig.level: unknown level {self.level!r}; choose one of {LEVELS}")
        chosen = [n for n in ("threshold", "topk", "topk_fraction") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"DiscoveryConfig: give at most one of threshold, topk, topk_fraction (got {chosen})")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"DiscoveryConfig.threshold must be a finite number >= 0, got {self.threshold}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"DiscoveryConfig.topk must be >= 1, got {self.topk}")
        if self.topk_fraction is not None and not 0 < self.topk_fraction <= 1:
            raise ValueError(f"DiscoveryConfig.topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if not (math.isfinite(self.faithfulness_target) and 0 < self.faithfulness_target <= 1.5):
            raise ValueError(f"DiscoveryConfig.faithfulness_target must be in (0, 1.5], got {self.faithfulness_target}")
        if self.ig_steps < 1:
            raise ValueError(f"DiscoveryConfig.ig_steps must be >= 1, got {self.ig_steps}")
        if self.n_prompts < 1:
            raise ValueError(f"DiscoveryConfig.n_prompts must be >= 1, got {self.n_prompts}")
        if self.window < 1:
            raise ValueError(f"DiscoveryConfig.window must be >= 1, got {self.window}")
        if self.call_overhead is not None and not (math.isfinite(self.call_overhead) and self.call_overhead >= 0):
            raise ValueError(f"DiscoveryConfig.call_overhead must be a finite number >= 0, got {self.call_overhead}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"DiscoveryConfig.chunk_size must be >= 1, got {self.chunk_size}")
        if self.prompt_batch is not None and self.prompt_batch < 1:
            raise ValueError(f"DiscoveryConfig.prompt_batch must be >= 1, got {self.prompt_batch}")
        if self.warm_start is not None and self.warm_start_fraction is not None:
            raise ValueError("DiscoveryConfig: give at most one of warm_start, warm_start_fraction")
        if self.warm_start is not None and self.warm_start < 1:
            raise ValueError(f"DiscoveryConfig.warm_start must be >= 1, got {self.warm_start}")
        if self.warm_start_fraction is not None and not 0 < self.warm_start_fraction <= 1:
            raise ValueError(f"DiscoveryConfig.warm_start_fraction must be in (0, 1], got {self.warm_start_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscoveryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DiscoveryConfig.from_dict: unknown field(s) {unknown}")
        return cls(**d)

    def provenance(self) -> dict[str, Any]:
        """The fields that determine the result (run-control fields such as ``progress`` dropped)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_FIELDS}

    def warm_start_size(self, n_edges: int) -> int | None:
        """The number of warm-start candidates out of ``n_edges`` (``None``: no warm start)."""
        if self.warm_start is not None:
            return min(self.warm_start, n_edges)
        if self.warm_start_fraction is not None:
            return max(1, min(n_edges, int(math.floor(self.warm_start_fraction * n_edges + 0.5))))
        return None


@dataclass(frozen=True)
class DiscoveryResult:
    """What an algorithm found.

    Attributes:
        scores: the engine's :class:`patching.scores.Scores` of every unit (edges, nodes or neurons).
            For ACDC a unit's value is the metric change measured when ACDC tried to remove it
            (0 for edges into receivers ACDC skipped because they no longer reach the output).
        kept: ``[U]`` which units are in the circuit, aligned with ``scores.ids``.
        level: ``edge``, ``node`` or ``neuron``.
        method: the registry name of the algorithm.
        forward_passes: model calls (a batched call over many masks counts one), including scoring.
        ablations: ablation masks evaluated (for attribution methods: 0).
        seconds: wall time of the algorithm.
        stats: more numbers (floats / ints), e.g. ACDC's final metric and its skipped receivers.
        ranking: ``[U]`` importance of each unit, larger = more important (``-inf`` last), for methods whose
            scores are not per-unit effects (greedy: the order of removal; an ACDC tau sweep: the largest tau
            that keeps the unit). ``None``: rank by ``|score|`` (the scores estimate each unit's own effect).
        ranking_kind: what :meth:`importance` ranks by, for reports (:data:`RANKING_KINDS`).
    """

    scores: Any  # patching.scores.Scores
    kept: Bool[Tensor, " U"]
    level: str
    method: str
    forward_passes: int
    ablations: int
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    ranking: Float[Tensor, " U"] | None = None
    ranking_kind: str = "abs-score"

    def __post_init__(self) -> None:
        if self.kept.dtype != torch.bool or self.kept.shape != (len(self.scores.ids),):
            raise ValueError(f"DiscoveryResult.kept must be a bool tensor of shape ({len(self.scores.ids)},), "
                             f"got {self.kept.dtype} {tuple(self.kept.shape)}")
        if self.ranking is not None and self.ranking.shape != (len(self.scores.ids),):
            raise ValueError(f"DiscoveryResult.ranking must have shape ({len(self.scores.ids)},), "
                             f"got {tuple(self.ranking.shape)}")
        if self.ranking_kind not in RANKING_KINDS:
            raise ValueError(f"DiscoveryResult.ranking_kind: unknown {self.ranking_kind!r}; "
                             f"choose one of {sorted(RANKING_KINDS)}")
        if (self.ranking is None) != (self.ranking_kind == "abs-score"):
            raise ValueError("DiscoveryResult: give ranking together with a ranking_kind other than 'abs-score'")

    @property
    def kept_ids(self) -> tuple[str, ...]:
        return tuple(i for i, k in zip(self.scores.ids, self.kept.tolist(), strict=True) if k)

    def importance(self) -> Float[Tensor, " U"]:
        """``[U]`` float64, larger = more important: :attr:`ranking`, else ``|score|`` (NaN -> ``-inf``)."""
        if self.ranking is not None:
            r = self.ranking.detach().double().cpu()
        else:
            r = self.scores.values.detach().double().cpu().abs()
        return torch.where(torch.isnan(r), torch.full_like(r, -math.inf), r)

    def to_dict(self) -> dict[str, Any]:
        """Json-able; the scores carry their ComponentGraph's description."""
        d = {"method": self.method, "level": self.level, "forward_passes": self.forward_passes,
             "ablations": self.ablations, "seconds": self.seconds, "stats": dict(self.stats),
             "kept": self.kept.tolist(), "scores": self.scores.to_dict(), "ranking_kind": self.ranking_kind}
        if self.ranking is not None:
            d["ranking"] = [x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
                            for x in self.ranking.double().tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], graph: Any = None) -> DiscoveryResult:
        """Inverse of :meth:`to_dict` (pass the ComponentGraph to reuse it instead of rebuilding it)."""
        from patching.scores import Scores

        ranking = None
        if d.get("ranking") is not None:
            ranking = torch.tensor([float(x) for x in d["ranking"]], dtype=torch.float64)
        return cls(scores=Scores.from_dict(d["scores"], graph), kept=torch.tensor(d["kept"], dtype=torch.bool),
                   level=d["level"], method=d["method"], forward_passes=int(d["forward_passes"]),
                   ablations=int(d["ablations"]), seconds=float(d["seconds"]), stats=dict(d.get("stats", {})),
                   ranking=ranking, ranking_kind=d.get("ranking_kind", "abs-score"))


AlgorithmFn = Callable[[Any, Any, Any, DiscoveryConfig], DiscoveryResult]


@dataclass(frozen=True)
class Algorithm:
    """A registered discovery algorithm: the function plus what the CLI and ``discover`` need to know.

    Attributes:
        name: registry key (``acdc``, ``eap``, ``eap-ig``, ``greedy``, ``node-patch``, ``node-atp``).
        fn: the algorithm.
        levels: supported levels; the first is the default.
        default_metric: ``kl`` or ``task`` (the task's own metric).
        selection: ``threshold`` (ACDC's tau only), ``topk`` (top-k, top fraction or |score| threshold) or
            ``target`` (greedy: stops at the faithfulness target; no threshold).
        default_threshold / default_topk_fraction: the selection used when the config gives none.
        needs_edges: whether the model's graph must support edge patching.
        gradient: whether the method scores by gradients (attribution): its metric must have an informative
            gradient at the clean run.
        warm_start: whether the method accepts an EAP-IG warm start (``warm_start`` / ``warm_start_fraction``).
    """

    name: str
    fn: AlgorithmFn
    levels: tuple[str, ...]
    default_metric: str
    selection: str
    default_threshold: float | None = None
    default_topk_fraction: float | None = None
    needs_edges: bool = True
    gradient: bool = False
    warm_start: bool = False

    def __call__(self, model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
        return self.fn(model, graph, batch, config)

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name


ALGORITHMS: dict[str, Algorithm] = {}
SELECTIONS = ("threshold", "topk", "target")


def register(name: str, *, levels: tuple[str, ...], default_metric: str, selection: str,
             default_threshold: float | None = None, default_topk_fraction: float | None = None,
             needs_edges: bool = True, gradient: bool = False,
             warm_start: bool = False) -> Callable[[AlgorithmFn], AlgorithmFn]:
    """Decorator: register ``fn`` under ``name`` in :data:`ALGORITHMS`."""
    if selection not in SELECTIONS:
        raise ValueError(f"register({name!r}): selection must be one of {SELECTIONS}, got {selection!r}")

    def deco(fn: AlgorithmFn) -> AlgorithmFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        ALGORITHMS[name] = Algorithm(name=name, fn=fn, levels=levels, default_metric=default_metric,
                                     selection=selection, default_threshold=default_threshold,
                                     default_topk_fraction=default_topk_fraction, needs_edges=needs_edges,
                                     gradient=gradient, warm_start=warm_start)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown discovery method {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def edge_support(source: Any) -> tuple[bool, str]:
    """``(supports_edges, reason)`` from a ComponentGraph (``supports_edges``, ``meta["edge_reason"]``) or from
    the architecture facts of :func:`circuits.models.model_facts` (read before any weights load: recurrent /
    state-space models have no per-component edges; anything else is decided by the graph once built)."""
    if hasattr(source, "supports_edges"):
        return bool(source.supports_edges), str((getattr(source, "meta", None) or {}).get("edge_reason", ""))
    family = getattr(source, "family", None)
    if family == "recurrent":
        kind = getattr(source, "model_type", "") or getattr(source, "architecture", "") or "recurrent"
        return False, f"{kind}: recurrent/state-space blocks have no per-component edges"
    return True, ""


def resolve_config(algorithm: Algorithm, config: DiscoveryConfig, task_metric: str = "logit_diff",
                   *, graph: Any = None, facts: Any = None) -> DiscoveryConfig:
    """``config`` with the method's defaults filled in and checked against what the method supports.

    Fills ``metric`` (``kl`` or the task metric), ``level``, the default threshold / top fraction when no
    selection is given, and the warm start's metric; greedy's ``topk`` / ``topk_fraction`` become its warm
    start. Decides before any weights load whether the method applies: the level, the selection, a warm
    start, the metric's gradient for attribution methods (:func:`check_gradient_metric`), and, given the
    model's ``graph`` or its architecture ``facts``, whether edges exist. Raises a one-line ``ValueError``
    naming the reason.
    """
    from dataclasses import replace

    from patching.metrics import METRICS

    metric = config.metric or (task_metric if algorithm.default_metric == "task" else algorithm.default_metric)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    level = config.level or algorithm.levels[0]
    if level not in algorithm.levels:
        raise ValueError(f"method {algorithm.name!r} does not support --level {level}; "
                         f"it supports {', '.join(algorithm.levels)}")
    if algorithm.selection == "threshold" and (config.topk is not None or config.topk_fraction is not None):
        raise ValueError(f"method {algorithm.name!r} selects by threshold (tau) only; --topk does not apply "
                         f"(--warm-start N limits its candidates to EAP-IG's top N edges)")
    if algorithm.selection == "target" and config.threshold is not None:
        raise ValueError(f"method {algorithm.name!r}: --threshold does not apply; it stops at the faithfulness "
                         f"target (--target), and --topk / --warm-start set the size of its EAP-IG warm start")
    warm = {"warm_start": config.warm_start, "warm_start_fraction": config.warm_start_fraction}
    if algorithm.selection == "target" and (config.topk is not None or config.topk_fraction is not None):
        if config.warm_start is not None or config.warm_start_fraction is not None:
            raise ValueError(f"method {algorithm.name!r}: give --topk or --warm-start, not both (both set the size "
                             f"of its EAP-IG warm start)")
        warm = {"warm_start": config.topk, "warm_start_fraction": config.topk_fraction}
    has_warm = warm["warm_start"] is not None or warm["warm_start_fraction"] is not None
    if has_warm and not algorithm.warm_start:
        raise ValueError(f"method {algorithm.name!r} takes no warm start (--warm-start applies to acdc and greedy)")
    if config.multi_removal and algorithm.selection != "target":
        raise ValueError(f"method {algorithm.name!r}: --multi-removal applies to greedy only")
    if config.qk_fix and not ((algorithm.gradient and "edge" in algorithm.levels) or has_warm):
        raise ValueError(f"method {algorithm.name!r}: --qk-fix applies to the edge attribution methods (eap, eap-ig) "
                         f"and the EAP-IG warm starts of acdc and greedy")
    sel: dict[str, Any] = {}
    if algorithm.selection == "target":
        sel = {"topk": None, "topk_fraction": None}
    elif config.threshold is None and config.topk is None and config.topk_fraction is None:
        if algorithm.default_threshold is not None:
            sel["threshold"] = algorithm.default_threshold
        elif algorithm.default_topk_fraction is not None:
            sel["topk_fraction"] = algorithm.default_topk_fraction
    warm_metric = None
    if has_warm:
        warm_metric = config.warm_start_metric or (task_metric if metric in DIVERGENCE_METRICS
                                                   and algorithm.selection == "threshold" else metric)
        check_gradient_metric(f"{algorithm.name} (its EAP-IG warm start)", "eap-ig", warm_metric,
                              steps=config.ig_steps)
    if algorithm.gradient:
        check_gradient_metric(algorithm.name, algorithm.name, metric, steps=config.ig_steps)
    for source in (facts, graph):
        if source is not None and algorithm.needs_edges:
            supports, reason = edge_support(source)
            if not supports:
                node_methods = ", ".join(n for n, a in ALGORITHMS.items() if not a.needs_edges)
                raise ValueError(f"method {algorithm.name!r} patches edges, which this model does not support "
                                 f"({reason or 'no per-component edges'}); use a node method: {node_methods}")
    return replace(config, metric=metric, level=level, warm_start_metric=warm_metric, **warm, **sel)


def check_gradient_metric(what: str, method: str, metric: str, *, steps: int | None = None) -> None:
    """Refuse (one-line ``ValueError``) a gradient method whose metric has no informative gradient.

    Delegates to the engine's :func:`patching.attribution.check_gradient_metric` (which decides what each
    attribution method can differentiate: ``accuracy`` never, ``kl`` only with EAP-IG); every other distance
    to the clean run in :data:`DIVERGENCE_METRICS` (``l2``) is zero and minimal at the clean run just as
    ``kl``, so it gets ``kl``'s verdict. ``what`` names the method in the message.
    """
    from patching.attribution import check_gradient_metric as engine_check

    as_engine = "kl" if metric in DIVERGENCE_METRICS else metric
    try:
        engine_check(method, as_engine, steps=steps)
    except ValueError as e:
        msg = str(e).replace("'kl'", repr(metric)) if as_engine != metric else str(e)
        raise ValueError(f"{what}: {msg}") from None
