"""Scorers of explanations against held-out exemplars, one per module behind :data:`SCORERS`.

``simulation`` (Bills et al. 2023), ``detection`` and ``fuzzing`` (Paulo et al. 2024) need an LLM
endpoint; ``embedding`` (all-MiniLM-L6-v2, offline), ``tokens`` (token-list explanations) and ``rule``
(synthetic units with a known rule) do not. Each returns a :class:`ScorerOutput`; the score itself is
:func:`evals.explanation_scores.score_record` of it.
"""

from explainers.scoring import detection, embedding, fuzzing, rule, simulation, tokens  # noqa: F401  (register)
from explainers.scoring.base import SCORERS, Scorer, ScorerOutput, positive_threshold, split_labels


def build_scorer(name: str, *, client=None, seed: int = 0) -> Scorer:
    """A scorer by name with its defaults; LLM scorers need ``client`` (an ``LLMClient``)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    cls = SCORERS[name]
    if cls.needs_llm:
        if client is None:
            raise ValueError(f"scorer {name!r} needs an LLM endpoint (--llm-base-url / OPENAI_BASE_URL)")
        if name in ("detection", "fuzzing"):
            return cls(client, seed=seed)
        return cls(client)
    return cls()


__all__ = ["SCORERS", "Scorer", "ScorerOutput", "build_scorer", "positive_threshold", "split_labels"]
