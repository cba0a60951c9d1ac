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
from jaxtyping import Bool
from torch import Tensor

ABLATIONS = ("resample", "mean", "zero")
LEVELS = ("edge", "node", "neuron")
# Fields that steer how a run is carried out (progress bar, checkpoint file) but not its result:
# they are left out of the provenance so that the same discovery gives the same graph.
RUN_CONTROL_FIELDS = ("progress", "checkpoint", "resume", "chunk_size")


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
    """

    scores: Any  # patching.scores.Scores
    kept: Bool[Tensor, " U"]
    level: str
    method: str
    forward_passes: int
    ablations: int
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kept.dtype != torch.bool or self.kept.shape != (len(self.scores.ids),):
            raise ValueError(f"DiscoveryResult.kept must be a bool tensor of shape ({len(self.scores.ids)},), "
                             f"got {self.kept.dtype} {tuple(self.kept.shape)}")

    @property
    def kept_ids(self) -> tuple[str, ...]:
        return tuple(i for i, k in zip(self.scores.ids, self.kept.tolist(), strict=True) if k)

    def to_dict(self) -> dict[str, Any]:
        """Json-able; the scores carry their ComponentGraph's description."""
        return {"method": self.method, "level": self.level, "forward_passes": self.forward_passes,
                "ablations": self.ablations, "seconds": self.seconds, "stats": dict(self.stats),
                "kept": self.kept.tolist(), "scores": self.scores.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], graph: Any = None) -> DiscoveryResult:
        """Inverse of :meth:`to_dict` (pass the ComponentGraph to reuse it instead of rebuilding it)."""
        from patching.scores import Scores

        return cls(scores=Scores.from_dict(d["scores"], graph), kept=torch.tensor(d["kept"], dtype=torch.bool),
                   level=d["level"], method=d["method"], forward_passes=int(d["forward_passes"]),
                   ablations=int(d["ablations"]), seconds=float(d["seconds"]), stats=dict(d.get("stats", {})))


AlgorithmFn = Callable[[Any, Any, Any, DiscoveryConfig], DiscoveryResult]


@dataclass(frozen=True)
class Algorithm:
    """A registered discovery algorithm: the function plus what the CLI and ``discover`` need to know.

    Attributes:
        name: registry key (``acdc``, ``eap``, ``eap-ig``, ``node-patch``, ``node-atp``).
        fn: the algorithm.
        levels: supported levels; the first is the default.
        default_metric: ``kl`` or ``task`` (the task's own metric).
        selection: ``threshold`` (ACDC's tau only) or ``topk`` (top-k, top fraction or |score| threshold).
        default_threshold / default_topk_fraction: the selection used when the config gives none.
        needs_edges: whether the model's graph must support edge patching.
    """

    name: str
    fn: AlgorithmFn
    levels: tuple[str, ...]
    default_metric: str
    selection: str
    default_threshold: float | None = None
    default_topk_fraction: float | None = None
    needs_edges: bool = True

    def __call__(self, model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
        return self.fn(model, graph, batch, config)

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, *, levels: tuple[str, ...], default_metric: str, selection: str,
             default_threshold: float | None = None, default_topk_fraction: float | None = None,
             needs_edges: bool = True) -> Callable[[AlgorithmFn], AlgorithmFn]:
    """Decorator: register ``fn`` under ``name`` in :data:`ALGORITHMS`."""
    if selection not in ("threshold", "topk"):
        raise ValueError(f"register({name!r}): selection must be 'threshold' or 'topk', got {selection!r}")

    def deco(fn: AlgorithmFn) -> AlgorithmFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        ALGORITHMS[name] = Algorithm(name=name, fn=fn, levels=levels, default_metric=default_metric,
                                     selection=selection, default_threshold=default_threshold,
                                     default_topk_fraction=default_topk_fraction, needs_edges=needs_edges)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown discovery method {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def resolve_config(algorithm: Algorithm, config: DiscoveryConfig, task_metric: str = "logit_diff",
                   *, graph: Any = None) -> DiscoveryConfig:
    """``config`` with the method's defaults filled in and checked against what the method supports.

    Fills ``metric`` (``kl`` or the task metric), ``level`` and, when no selection is given, the method's
    default threshold / top fraction. Raises ``ValueError`` naming the offending option.
    """
    from dataclasses import replace

    metric = config.metric or (task_metric if algorithm.default_metric == "task" else algorithm.default_metric)
    level = config.level or algorithm.levels[0]
    if level not in algorithm.levels:
        raise ValueError(f"method {algorithm.name!r} does not support --level {level}; "
                         f"it supports {', '.join(algorithm.levels)}")
    if algorithm.selection == "threshold" and (config.topk is not None or config.topk_fraction is not None):
        raise ValueError(f"method {algorithm.name!r} selects by threshold (tau) only; --topk does not apply")
    sel: dict[str, Any] = {}
    if config.threshold is None and config.topk is None and config.topk_fraction is None:
        if algorithm.default_threshold is not None:
            sel["threshold"] = algorithm.default_threshold
        elif algorithm.default_topk_fraction is not None:
            sel["topk_fraction"] = algorithm.default_topk_fraction
    if graph is not None and algorithm.needs_edges and not getattr(graph, "supports_edges", True):
        raise ValueError(f"method {algorithm.name!r} patches edges, which this model's graph does not support "
                         f"(recurrent/state-space blocks have no per-component edges); use a node method: "
                         f"{', '.join(n for n, a in ALGORITHMS.items() if not a.needs_edges)}")
    return replace(config, metric=metric, level=level, **sel)
