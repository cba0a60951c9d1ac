"""Dyck: predict the bracket that closes the innermost open one (after Weiss, Goldberg & Yahav 2021,
"Thinking Like Transformers", arXiv:2106.06981, and Ebrahimi et al. 2020 on Dyck-n with self-attention).

The prompt is a prefix of a well-nested string over three bracket types with at least one bracket still
open and a closing bracket last, written without spaces, e.g. ``([]{()`` -> ``}``. The minimal
corruption changes one token: the innermost unmatched opening bracket becomes another type
(``([][()`` -> ``]``), which flips the correct closer while keeping every other token and the depth. Answer = the clean closer, wrong = the corrupted
prompt's closer; the default metric is the logit difference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.vocab import BRACKETS

OPEN = tuple(o for o, _ in BRACKETS)
CLOSER = {o: c for o, c in BRACKETS}


@dataclass(frozen=True)
class DyckExample:
    """A bracket prefix with open brackets left, and the index of the innermost unmatched opener."""

    tokens: tuple[str, ...]
    top: int
    replacement: str            # the opener written at ``top`` in the corrupted prompt

    @property
    def answer(self) -> str:
        return CLOSER[self.tokens[self.top]]

    def pair(self) -> PromptPair:
        corrupt = self.tokens[:self.top] + (self.replacement,) + self.tokens[self.top + 1:]
        return PromptPair(clean="".join(self.tokens), corrupt="".join(corrupt),
                          answer=self.answer, wrong=CLOSER[self.replacement])


def closers(tokens: tuple[str, ...] | list[str]) -> list[str | None]:
    """For each prefix ``tokens[:i+1]``, the bracket that closes its innermost open one (None when balanced)."""
    stack: list[str] = []
    out: list[str | None] = []
    for t in tokens:
        if t in CLOSER:
            stack.append(t)
        else:
            if not stack or CLOSER[stack[-1]] != t:
                raise ValueError(f"dyck: {''.join(tokens)!r} is not a prefix of a balanced string")
            stack.pop()
        out.append(CLOSER[stack[-1]] if stack else None)
    return out


def sample_dyck(rng: random.Random, min_len: int = 4, max_len: int = 20, max_depth: int = 4,
                p_open: float = 0.5, end_with_close: bool = True) -> DyckExample:
    """A random bracket prefix of ``min_len..max_len`` tokens, depth <= ``max_depth``, ending with depth >= 1.

    With ``end_with_close`` the last token is a closing bracket, so the innermost open bracket lies further
    back and the answer cannot be read off the last token (the task's prompts); training data uses every
    prefix.
    """
    length = rng.randint(min_len, max_len)
    while True:
        tokens: list[str] = []
        stack: list[int] = []
        for i in range(length):
            depth = len(stack)
            if depth == 0 or (depth < max_depth and rng.random() < p_open):
                stack.append(i)
                tokens.append(rng.choice(OPEN))
            else:
                tokens.append(CLOSER[tokens[stack.pop()]])
        if stack and not (end_with_close and tokens[-1] in CLOSER):
            top = stack[-1]
            replacement = rng.choice([o for o in OPEN if o != tokens[top]])
            return DyckExample(tokens=tuple(tokens), top=top, replacement=replacement)


def dyck(n: int = 64, seed: int = 0) -> Task:
    """Bracket prefixes over ()[]{}; corrupt = innermost open bracket changed; answer = its closer."""
    rng = random.Random(seed)
    pairs = tuple(sample_dyck(rng).pair() for _ in range(n))
    return Task(name="dyck", pairs=pairs, metric="logit_diff", source=f"generator:dyck seed={seed} n={n}")
