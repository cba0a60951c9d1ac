"""Dyck: predict the bracket that closes the innermost open one (after Weiss, Goldberg & Yahav 2021,
"Thinking Like Transformers", arXiv:2106.06981, and Ebrahimi et al. 2020 on Dyck-n with self-attention).

The prompt is a prefix of a well-nested string over three bracket types with at least one bracket still
open and a closing bracket last, written without spaces, e.g. ``([]{()`` -> ``}``. The minimal
corruption changes one token: the innermost unmatched opening bracket becomes another type
(``([][()`` -> ``]``), which flips the correct closer while keeping every other token and the depth. Answer = the clean closer, wrong = the corrupted
prompt's closer; the default metric is the logit difference.

Byte-level BPE tokenizers merge bracket runs (SmolLM2 has tokens ``()``, ``((``, ``]}`` ...), so a
tokenizer in which any two brackets merge gets the brackets separated by spaces, each `` (`` one token
(``" ( [ ] { ( )"`` -> `` }``); :func:`bracket_style` decides once per tokenizer and refuses in one line
when neither form gives one token per bracket.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.lexicon import draw_pairs, is_one_token, token_ids, tokenizer_label
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

    def pair(self, spaced: bool = False) -> PromptPair:
        """Brackets glued (``([]{()``) or, with ``spaced``, each after a space (``" ( [ ] { ( )"``)."""
        corrupt = self.tokens[:self.top] + (self.replacement,) + self.tokens[self.top + 1:]
        sep = " " if spaced else ""
        return PromptPair(clean="".join(sep + t for t in self.tokens), corrupt="".join(sep + t for t in corrupt),
                          answer=sep + self.answer, wrong=sep + CLOSER[self.replacement])


def bracket_style(tokenizer: Any | None) -> bool:
    """``False`` (glued brackets) when each bracket is one token and no two merge, ``True`` (spaced) when
    each `` (`` is one token; a one-line ``ValueError`` otherwise. ``None`` (the zoo) is glued."""
    if tokenizer is None:
        return False
    chars = [b for pair in BRACKETS for b in pair]
    if all(is_one_token(tokenizer, b) for b in chars) and all(len(token_ids(tokenizer, a + b)) == 2
                                                              for a in chars for b in chars):
        return False
    if all(is_one_token(tokenizer, " " + b) for b in chars):
        return True
    raise ValueError(f"dyck: tokenizer {tokenizer_label(tokenizer)} has no one-token form of every bracket "
                     f"(glued or after a space): {[b for b in chars if not is_one_token(tokenizer, ' ' + b)]}")


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


def dyck(n: int = 64, seed: int = 0, tokenizer: Any | None = None) -> Task:
    """Bracket prefixes over ()[]{}; corrupt = innermost open bracket changed; answer = its closer."""
    spaced = bracket_style(tokenizer)
    rng = random.Random(seed)
    pairs = draw_pairs("dyck", n, lambda: sample_dyck(rng).pair(spaced), tokenizer)
    return Task(name="dyck", pairs=pairs, metric="logit_diff", source=f"generator:dyck seed={seed} n={n}")
