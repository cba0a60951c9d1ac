"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593).

A prompt names two people, repeats one of them (the subject ``S``) and asks for the other (the indirect
object ``IO``): "When Mary and John went to the store, John gave a drink to" -> " Mary". Both orders of
the first clause occur (ABBA: IO first; BABA: S first). The corrupted prompt is the paper's "ABC"
distribution: the same template with the three name slots filled by three other, distinct names, so no
name is repeated and neither the answer nor the wrong name occurs. Answer = `` IO``, wrong = `` S``;
the default metric is the logit difference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.vocab import IOI_TEMPLATES, NAMES, OBJECTS, PLACES


@dataclass(frozen=True)
class IOIExample:
    """One IOI prompt: template index, the names in order of appearance, place and object."""

    template: int
    io: str
    s: str
    abba: bool                      # True: IO named first ("A and B ..., B gave ... to" -> A)
    place: str
    obj: str
    corrupt_names: tuple[str, str, str]

    def text(self, a: str, b: str, s: str) -> str:
        return IOI_TEMPLATES[self.template].format(A=a, B=b, S=s, PLACE=self.place, OBJECT=self.obj)

    @property
    def clean(self) -> str:
        a, b = (self.io, self.s) if self.abba else (self.s, self.io)
        return self.text(a, b, self.s)

    @property
    def corrupt(self) -> str:
        return self.text(*self.corrupt_names)

    def pair(self) -> PromptPair:
        return PromptPair(clean=self.clean, corrupt=self.corrupt, answer=" " + self.io, wrong=" " + self.s)


def sample_ioi(rng: random.Random, names: tuple[str, ...] = NAMES) -> IOIExample:
    """Draw one IOI example (ABBA or BABA with equal probability) from ``rng``."""
    picked = rng.sample(names, 5)
    return IOIExample(template=rng.randrange(len(IOI_TEMPLATES)), io=picked[0], s=picked[1],
                      abba=rng.random() < 0.5, place=rng.choice(PLACES), obj=rng.choice(OBJECTS),
                      corrupt_names=(picked[2], picked[3], picked[4]))


def ioi(n: int = 64, seed: int = 0) -> Task:
    """IOI prompts (ABBA and BABA) with ABC corruptions; answer = indirect object, wrong = subject."""
    rng = random.Random(seed)
    pairs = tuple(sample_ioi(rng).pair() for _ in range(n))
    return Task(name="ioi", pairs=pairs, metric="logit_diff", source=f"generator:ioi seed={seed} n={n}")
