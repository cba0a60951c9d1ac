"""A rule-based simulator for synthetic units, whose true rule is known (an oracle for the scoring pipeline).

An explanation in the rule language predicts 1 on the tokens it matches and 0 elsewhere; scored by
Pearson's correlation with the true activations (metric ``pearson``). A synthetic unit that fires exactly
where its rule matches therefore scores 1 with its own rule as the explanation, and about 0 with an
unrelated rule. Rules (token text compared whitespace-stripped and case-folded):

- ``tokens: a | b | c``  the token is one of these;
- ``after: a | b``       the previous token is one of these;
- ``regex: PATTERN``     ``re.search(PATTERN, token)`` (on the raw token text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, register

Rule = Callable[[Sequence[str], int], bool]


def _norm(t: str) -> str:
    return t.strip().casefold()


def parse_rule(text: str) -> Rule:
    """The predicate ``rule(tokens, i)`` of a rule explanation; ``ValueError`` naming the problem."""
    kind, sep, body = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("tokens", "after", "regex"):
        raise ValueError(f"not a rule (tokens: / after: / regex:): {text[:60]!r}")
    if kind == "regex":
        try:
            pattern = re.compile(body.strip())
        except re.error as e:
            raise ValueError(f"bad regex in rule {text[:60]!r}: {e}") from e
        return lambda toks, i: bool(pattern.search(toks[i]))
    words = {_norm(w) for w in body.split("|") if _norm(w)}
    if not words:
        raise ValueError(f"rule lists no tokens: {text[:60]!r}")
    if kind == "tokens":
        return lambda toks, i: _norm(toks[i]) in words
    return lambda toks, i: i > 0 and _norm(toks[i - 1]) in words


def apply_rule(rule: Rule | str, tokens: Sequence[str]) -> list[float]:
    r = parse_rule(rule) if isinstance(rule, str) else rule
    return [1.0 if r(tokens, i) else 0.0 for i in range(len(tokens))]


@register
class RuleScorer(Scorer):
    """The rule language as a simulator; see the module docstring."""

    name = "rule"
    metric = "pearson"

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        assert explanation.text is not None
        try:
            rule = parse_rule(explanation.text)
        except ValueError as e:
            return self.failure(explanation, str(e))
        preds = [apply_rule(rule, r.tokens) for r in held_out]
        return self.output(explanation, preds, [r.activations for r in held_out], [r.id for r in held_out])
