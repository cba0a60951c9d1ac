"""Greater-than (Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?", arXiv:2305.00586).

"The war lasted from the year 1732 to the year 17" -> a year above 32. The start year's last two digits
``YY`` run over 02..98 and the century over 11..17. The corrupted prompt sets the start year to ``CC01``
(the paper's "01" baseline), after which every two-digit continuation is as plausible as any other. The
paper's figure, the probability difference sum_{y > YY} p(y) - sum_{y <= YY} p(y), needs all year tokens
and is measured by the zoo (``circuits/zoo/measure.py``); as a single-token contrast the task uses answer
= ``YY+1`` and wrong = ``YY-1``, the nearest years on either side of the threshold, scored by logit
difference.

The task depends on how a tokenizer writes years, decided once per tokenizer (:func:`year_mode`):

* ``two_digit`` (the zoo's tokenizer, GPT-2): ``17`` + ``32`` are one token each; answer ``YY+1``,
  wrong ``YY-1`` as above.
* ``digit`` (SmolLM2, Llama 3, Qwen, ...: every digit is a token): after "to the year 17" the next token is
  the end year's *tens digit*. A later year has a tens digit >= that of ``YY`` (equal is ambiguous), an
  earlier one <=, so ``YY`` is drawn from 10..89 and answer = tens digit + 1, wrong = tens digit - 1 (the
  nearest digits that are surely above / below). The "01" corruption has tens digit 0. The
  probability-difference analogue sums the ten digit tokens: p(d > t) - p(d < t) (``circuits/zoo``).
* anything else (years split irregularly): the generator refuses in one line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.lexicon import draw_pairs, is_one_token, token_ids, tokenizer_label
from circuits.tasks.vocab import GT_CENTURIES, GT_NOUNS, GT_TEMPLATE

YEAR_MODES = ("two_digit", "digit")


@dataclass(frozen=True)
class GreaterThanExample:
    """One greater-than prompt: noun, century (two digits) and the start year's last two digits."""

    noun: str
    century: str
    yy: int
    mode: str = "two_digit"

    def text(self, yy: int) -> str:
        return GT_TEMPLATE.format(NOUN=self.noun, CENTURY=self.century, YY=f"{yy:02d}")

    def pair(self) -> PromptPair:
        if self.mode == "digit":
            tens = self.yy // 10
            return PromptPair(clean=self.text(self.yy), corrupt=self.text(1), answer=str(tens + 1),
                              wrong=str(tens - 1))
        return PromptPair(clean=self.text(self.yy), corrupt=self.text(1),
                          answer=f"{self.yy + 1:02d}", wrong=f"{self.yy - 1:02d}")


def year_mode(tokenizer: Any | None) -> str:
    """``two_digit`` when every ``00``..``99`` is one token, ``digit`` when every digit is one token and
    two-digit strings are not; a one-line ``ValueError`` otherwise. ``None`` (the zoo) is ``two_digit``."""
    if tokenizer is None:
        return "two_digit"
    pairs = [f"{i:02d}" for i in range(100)]
    if all(is_one_token(tokenizer, y) for y in pairs):
        return "two_digit"
    if all(is_one_token(tokenizer, str(d)) for d in range(10)) and all(len(token_ids(tokenizer, y)) == 2
                                                                       for y in pairs):
        return "digit"
    bad = next(y for y in pairs if not is_one_token(tokenizer, y))
    raise ValueError(f"greater_than: tokenizer {tokenizer_label(tokenizer)} writes years neither as two-digit "
                     f"tokens nor digit by digit ({bad!r} -> {token_ids(tokenizer, bad)}); cannot build "
                     "single-token year answers")


def sample_greater_than(rng: random.Random, low: int = 2, high: int = 98, mode: str = "two_digit") -> GreaterThanExample:
    """Draw one example with ``YY`` uniform in ``low..high`` (02..98 for the task; training uses 01..98 so
    that the "01" corruption is a start year the model has seen, after which every year 02..99 is later)."""
    return GreaterThanExample(noun=rng.choice(GT_NOUNS), century=rng.choice(GT_CENTURIES), yy=rng.randint(low, high),
                              mode=mode)


def greater_than(n: int = 64, seed: int = 0, tokenizer: Any | None = None) -> Task:
    """Year spans "from the year 17YY to the year 17" with the "01" corruption; answer YY+1, wrong YY-1."""
    mode = year_mode(tokenizer)
    low, high = (10, 89) if mode == "digit" else (2, 98)
    rng = random.Random(seed)
    pairs = draw_pairs("greater_than", n, lambda: sample_greater_than(rng, low, high, mode).pair(), tokenizer)
    return Task(name="greater_than", pairs=pairs, metric="logit_diff",
                source=f"generator:greater_than seed={seed} n={n}")
