"""Scorer protocol, output record and registry.

A scorer takes an :class:`~explainers.llm.records.Explanation` and *held-out* records (exemplars the explainer
did not see; checked by id) and returns a :class:`ScorerOutput`: flat ``predicted`` / ``actual`` values over
the records, and the ``metric`` that turns them into a score. The math lives in
:mod:`evals.explanation_scores` (``score_record(output.to_dict())``), so scores can be recomputed from saved
records alone. One scorer per module, registered by name in :data:`SCORERS`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from explainers.llm.records import ActivationRecord, Explanation, check_held_out


@dataclass(frozen=True)
class ScorerOutput:
    """``predicted[i]`` against ``actual[i]``; ``lengths[j]`` values belong to record ``record_ids[j]`` (in
    order). ``failed`` says why there is no score (then the value lists may be empty)."""

    scorer: str
    metric: str
    unit: str
    predicted: tuple[float, ...] = ()
    actual: tuple[float, ...] = ()
    lengths: tuple[int, ...] = ()
    record_ids: tuple[str, ...] = ()
    failed: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "predicted", tuple(float(x) for x in self.predicted))
        object.__setattr__(self, "actual", tuple(float(x) for x in self.actual))
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "record_ids", tuple(self.record_ids))
        if len(self.predicted) != len(self.actual) or sum(self.lengths) != len(self.actual):
            raise ValueError(f"{self.scorer} output for {self.unit}: {len(self.predicted)} predictions, "
                             f"{len(self.actual)} actual values, record lengths summing to {sum(self.lengths)}")

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "metric": self.metric, "unit": self.unit, "predicted": list(self.predicted),
                "actual": list(self.actual), "lengths": list(self.lengths), "record_ids": list(self.record_ids),
                "failed": self.failed, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScorerOutput:
        return cls(scorer=d["scorer"], metric=d["metric"], unit=d["unit"], predicted=tuple(d["predicted"]),
                   actual=tuple(d["actual"]), lengths=tuple(d["lengths"]), record_ids=tuple(d["record_ids"]),
                   failed=d.get("failed"), meta=d.get("meta", {}))


class Scorer(ABC):
    """``await ascore(explanation, held_out)`` (LLM scorers run many units concurrently this way) or
    ``score(...)``. ``needs_llm`` scorers take an :class:`~explainers.llm.client.LLMClient`."""

    name: ClassVar[str]
    metric: ClassVar[str]
    needs_llm: ClassVar[bool] = False

    @abstractmethod
    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput: ...

    async def ascore(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        if not held_out:
            raise ValueError(f"{self.name} scorer, unit {explanation.unit}: no held-out records")
        check_held_out(explanation, held_out)
        if not explanation.ok:
            return self.failure(explanation, f"no explanation ({explanation.failed})")
        return await self._score(explanation, held_out)

    def score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        """Synchronous ``ascore`` (an LLM scorer runs it through its client, which closes its connections)."""
        client = getattr(self, "client", None)
        if client is not None:
            return client.run([self.ascore(explanation, held_out)], progress=False)[0]
        return asyncio.run(self.ascore(explanation, held_out))

    def failure(self, explanation: Explanation, reason: str, **meta: Any) -> ScorerOutput:
        return ScorerOutput(scorer=self.name, metric=self.metric, unit=explanation.unit, failed=reason, meta=meta)

    def output(self, explanation: Explanation, predicted: Sequence[Sequence[float]],
               actual: Sequence[Sequence[float]], record_ids: Sequence[str], **meta: Any) -> ScorerOutput:
        flat_p = [float(x) for p in predicted for x in p]
        flat_a = [float(x) for a in actual for x in a]
        return ScorerOutput(scorer=self.name, metric=self.metric, unit=explanation.unit, predicted=flat_p,
                            actual=flat_a, lengths=[len(a) for a in actual], record_ids=list(record_ids), meta=meta)


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.name in SCORERS:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    SCORERS[cls.name] = cls
    return cls


def positive_threshold(records: Sequence[ActivationRecord], rel: float = 0.5) -> float:
    """``rel`` times the largest activation over ``records``: a record is *active* (a positive for detection,
    fuzzing and embedding) when its largest activation reaches it, and so is a token. ``ValueError`` when no
    activation is positive (nothing to detect)."""
    m = max(r.max_activation for r in records)
    if m <= 0:
        raise ValueError("no positive activation in the held-out records")
    return rel * m


def split_labels(records: Sequence[ActivationRecord], rel: float) -> list[int]:
    t = positive_threshold(records, rel)
    return [int(r.max_activation >= t) for r in records]


