"""Greater-than (Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?", arXiv:2305.00586).

"The war lasted from the year 1732 to the year 17" -> a year above 32. The start year's last two digits
``YY`` run over 02..98 and the century over 11..17. The corrupted prompt sets the start year to ``CC01``
(the paper's "01" baseline), after which every two-digit continuation is as plausible as any other. The
paper's figure, the probability difference sum_{y > YY} p(y) - sum_{y <= YY} p(y), needs all year tokens
and is measured by the zoo (``circuits/zoo/measure.py``); as a single-token contrast the task uses answer
= ``YY+1`` and wrong = ``YY-1``, the nearest years on either side of the threshold, scored by logit
difference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.vocab import GT_CENTURIES, GT_NOUNS, GT_TEMPLATE


@dataclass(frozen=True)
class GreaterThanExample:
    """One greater-than prompt: noun, century (two digits) and the start year's last two digits."""

    noun: str
    century: str
    yy: int

    def text(self, yy: int) -> str:
        return GT_TEMPLATE.format(NOUN=self.noun, CENTURY=self.century, YY=f"{yy:02d}")

    def pair(self) -> PromptPair:
        return PromptPair(clean=self.text(self.yy), corrupt=self.text(1),
                          answer=f"{self.yy + 1:02d}", wrong=f"{self.yy - 1:02d}")


def sample_greater_than(rng: random.Random, low: int = 2, high: int = 98) -> GreaterThanExample:
    """Draw one example with ``YY`` uniform in ``low..high`` (02..98 for the task; training uses 01..98 so
    that the "01" corruption is a start year the model has seen, after which every year 02..99 is later)."""
    return GreaterThanExample(noun=rng.choice(GT_NOUNS), century=rng.choice(GT_CENTURIES), yy=rng.randint(low, high))


def greater_than(n: int = 64, seed: int = 0) -> Task:
    """Year spans "from the year 17YY to the year 17" with the "01" corruption; answer YY+1, wrong YY-1."""
    rng = random.Random(seed)
    pairs = tuple(sample_greater_than(rng).pair() for _ in range(n))
    return Task(name="greater_than", pairs=pairs, metric="logit_diff",
                source=f"generator:greater_than seed={seed} n={n}")
