"""The ``tokens`` simulator: scores a token-list explanation (a vocabulary projection, a list of input
tokens) with no LLM.

Prediction on a token = 1 when the token, whitespace stripped and case folded, is one of the explanation's
tokens (normalised the same way), else 0; the score is Pearson's correlation with the true activations
over all held-out tokens (metric ``pearson``), as for the LLM simulator. The explanation's ``tokens`` are
used; an explanation without them is read as a comma-separated list of its text.
"""

from __future__ import annotations

from collections.abc import Sequence

from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, register


def normalise(token: str) -> str:
    return token.strip().casefold()


def explanation_tokens(explanation: Explanation) -> set[str]:
    raw = explanation.tokens or tuple((explanation.text or "").split(","))
    return {normalise(t) for t in raw if normalise(t)}


@register
class TokensScorer(Scorer):
    """Token membership as the simulation; see the module docstring."""

    name = "tokens"
    metric = "pearson"

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        vocab = explanation_tokens(explanation)
        if not vocab:
            return self.failure(explanation, "the explanation lists no tokens")
        preds = [[1.0 if normalise(t) in vocab else 0.0 for t in r.tokens] for r in held_out]
        return self.output(explanation, preds, [r.activations for r in held_out], [r.id for r in held_out],
                           n_tokens=len(vocab))
