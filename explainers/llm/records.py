"""Plain records the LLM explainers and the scorers exchange.

An :class:`ActivationRecord` is one context (a short document) as the subject model tokenised it, with one
activation of one unit per token. The exemplar stage (top-activating, random and quantile contexts from the
activation store) produces them; the prompt formats, the explainers and the scorers only read them, so they
plug into any store through a thin adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ActivationRecord:
    """One context: ``tokens[i]`` (as the subject model's tokenizer decodes it, leading spaces kept) and the
    unit's activation ``activations[i]`` on it. ``id`` names the context (store document and offset) so that
    explanation records can list which exemplars an explainer saw; ``source`` says how it was sampled
    (``top``, ``random``, ``quantile:K`` ...)."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    id: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(str(t) for t in self.tokens))
        object.__setattr__(self, "activations", tuple(float(a) for a in self.activations))
        where = f"record {self.id!r}" if self.id else "record"
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"{where}: {len(self.tokens)} tokens but {len(self.activations)} activations")
        if not self.tokens:
            raise ValueError(f"{where}: no tokens")
        bad = [i for i, a in enumerate(self.activations) if not math.isfinite(a)]
        if bad:
            raise ValueError(f"{where}: activation at token {bad[0]} ({self.tokens[bad[0]]!r}) is not finite")

    @property
    def max_activation(self) -> float:
        return max(self.activations)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "activations": list(self.activations), "id": self.id,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationRecord:
        return cls(tokens=tuple(d["tokens"]), activations=tuple(d["activations"]), id=d.get("id", ""),
                   source=d.get("source", ""))


@dataclass(frozen=True)
class Explanation:
    """An explanation of one unit. ``text`` is the description (``None`` when the explainer failed, with the
    reason in ``failed``: a failure is never an empty explanation). ``tokens`` holds a token-list explanation
    (vocabulary projections), which the ``tokens`` scorer reads. ``exemplar_ids`` are the records the
    explainer saw: scorers must be given others."""

    unit: str
    text: str | None
    explainer: str
    tokens: tuple[str, ...] = ()
    failed: str | None = None
    exemplar_ids: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "exemplar_ids", tuple(self.exemplar_ids))
        if self.text is None and self.failed is None:
            raise ValueError(f"explanation of {self.unit}: no text and no failure reason")
        if self.text is not None and not self.text.strip():
            raise ValueError(f"explanation of {self.unit}: empty text (record a failure with its reason instead)")

    @property
    def ok(self) -> bool:
        return self.text is not None

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "text": self.text, "explainer": self.explainer, "tokens": list(self.tokens),
                "failed": self.failed, "exemplar_ids": list(self.exemplar_ids), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Explanation:
        return cls(unit=d["unit"], text=d.get("text"), explainer=d["explainer"], tokens=tuple(d.get("tokens", ())),
                   failed=d.get("failed"), exemplar_ids=tuple(d.get("exemplar_ids", ())), meta=d.get("meta", {}))


def check_held_out(explanation: Explanation, held_out: Sequence[ActivationRecord]) -> None:
    """Refuse to score on a record the explainer saw (by id): every score is computed on held-out exemplars."""
    seen = set(explanation.exemplar_ids)
    for r in held_out:
        if r.id and r.id in seen:
            raise ValueError(f"unit {explanation.unit}: record {r.id!r} was shown to the explainer; "
                             "scores must use held-out records")
