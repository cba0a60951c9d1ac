"""Induction (Olsson et al. 2022, "In-context Learning and Induction Heads", arXiv:2209.11895).

A random sequence ``prefix + A + A[:k]`` of distinct generic words: the next word is ``A[k]``, predictable
only by finding the earlier occurrence of the current word and copying its successor. The corrupted
prompt replaces the first copy of ``A`` by other random words ``A'`` (same length), so the current word no
longer occurs earlier. Answer = `` A[k]``, wrong = `` A'[k]`` (what induction would predict from the
corrupted first copy); the default metric is the logit difference. Prompts start with a space so every
word is in its "after a space" form, as in the middle of a text.

Given a tokenizer, the words are ``INDUCTION_WORDS + EXTRA_INDUCTION_WORDS`` filtered to those that are
one token with a leading space (so a sequence of k words is k tokens and clean / corrupt lengths match);
the generator refuses in one line when fewer than ``length`` such words remain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.lexicon import draw_pairs, one_token_words, require
from circuits.tasks.vocab import EXTRA_INDUCTION_WORDS, INDUCTION_WORDS


@dataclass(frozen=True)
class InductionExample:
    """A repeated random sequence ``prefix + first + first``; ``other`` replaces ``first`` when corrupted."""

    prefix: tuple[str, ...]
    first: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def words(self) -> tuple[str, ...]:
        """The whole training sequence ``prefix + A + A``."""
        return self.prefix + self.first + self.first

    def pair(self, k: int) -> PromptPair:
        """The prompt cut after ``k`` words of the second copy (1 <= k < len(A))."""
        if not 1 <= k < len(self.first):
            raise ValueError(f"induction: cut k={k} outside 1..{len(self.first) - 1}")

        def text(words: tuple[str, ...]) -> str:
            return "".join(" " + w for w in words)

        return PromptPair(clean=text(self.prefix + self.first + self.first[:k]),
                          corrupt=text(self.prefix + self.other + self.first[:k]),
                          answer=" " + self.first[k], wrong=" " + self.other[k])


def sample_induction(rng: random.Random, length: int = 40, min_rep: int = 4, max_rep: int = 20,
                     words: tuple[str, ...] = INDUCTION_WORDS, distinct: bool = True) -> InductionExample:
    """Draw ``prefix + A + A`` of ``length`` words, ``|A|`` uniform in ``min_rep..max_rep``.

    With ``distinct`` all words of prefix, ``A`` and ``A'`` differ (unambiguous prompts); without, they are
    drawn independently with replacement (training data: distinct words would let a model lower its
    loss by excluding words already seen, a shortcut that competes with induction and delays it).
    """
    rep = rng.randint(min_rep, max_rep)
    n_prefix = length - 2 * rep
    n = n_prefix + 2 * rep
    if n_prefix < 0 or (distinct and n > len(words)):
        raise ValueError(f"induction: cannot fit |A|={rep} twice into {length} words from {len(words)} distinct")
    drawn = rng.sample(words, n) if distinct else [rng.choice(words) for _ in range(n)]
    return InductionExample(prefix=tuple(drawn[:n_prefix]), first=tuple(drawn[n_prefix:n_prefix + rep]),
                            other=tuple(drawn[n_prefix + rep:]))


def induction_words(tokenizer: Any | None = None, length: int = 40) -> tuple[str, ...]:
    """The zoo's words (``tokenizer=None``) or all words that are one token of ``tokenizer`` (at least ``length``)."""
    if tokenizer is None:
        return INDUCTION_WORDS
    pool = INDUCTION_WORDS + EXTRA_INDUCTION_WORDS
    return require("induction", tokenizer, "words", one_token_words(tokenizer, pool), len(pool), length)


def induction(n: int = 64, seed: int = 0, length: int = 40, tokenizer: Any | None = None) -> Task:
    """Repeated random word sequences; corrupt = first copy replaced; answer = next word of the repeat."""
    words = induction_words(tokenizer, length)
    rng = random.Random(seed)

    def draw() -> PromptPair:
        ex = sample_induction(rng, length=length, words=words)
        return ex.pair(rng.randint(1, len(ex.first) - 1))

    return Task(name="induction", pairs=draw_pairs("induction", n, draw, tokenizer), metric="logit_diff",
                source=f"generator:induction seed={seed} n={n}")
