"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593).

A prompt names two people, repeats one of them (the subject ``S``) and asks for the other (the indirect
object ``IO``): "When Mary and John went to the store, John gave a drink to" -> " Mary". Both orders of
the first clause occur (ABBA: IO first; BABA: S first). The corrupted prompt is the paper's "ABC"
distribution: the same template with the three name slots filled by three other, distinct names, so no
name is repeated and neither the answer nor the wrong name occurs. Answer = `` IO``, wrong = `` S``;
the default metric is the logit difference.

Without a tokenizer the generator uses the zoo's lists (50 names, 8 places, 8 objects, 8 templates). Given
a real tokenizer it draws from those plus the ``EXTRA_*`` lists of :mod:`circuits.tasks.vocab` (200 names,
15 templates from Wang et al.), keeping the names, places and objects that are one token with a leading
space and the templates with no unknown word, so the prompts are natural English for that model
("When Mary and John went to the store, John gave a drink to" -> " Mary").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.lexicon import draw_pairs, has_unknown, one_token_words, require, tokenizer_label
from circuits.tasks.vocab import (
    EXTRA_IOI_TEMPLATES,
    EXTRA_NAMES,
    EXTRA_OBJECTS,
    EXTRA_PLACES,
    IOI_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
)

#: Every template; ``IOIExample.template`` indexes this (the zoo's eight come first).
ALL_IOI_TEMPLATES: tuple[str, ...] = IOI_TEMPLATES + EXTRA_IOI_TEMPLATES


@dataclass(frozen=True)
class IOIVocab:
    """The words an IOI generator draws from: names, places, objects and template indices."""

    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    templates: tuple[int, ...]                  # indices into ALL_IOI_TEMPLATES


#: The zoo's lists (the zoo tokenizer's vocabulary is built from them).
ZOO_IOI = IOIVocab(NAMES, PLACES, OBJECTS, tuple(range(len(IOI_TEMPLATES))))


def ioi_vocab(tokenizer: Any | None = None) -> IOIVocab:
    """The zoo's lists (``tokenizer=None``) or all lists filtered to one-token words of ``tokenizer``.

    Raises a one-line ``ValueError`` when fewer than 5 names, or no place, object or template, survive.
    """
    if tokenizer is None:
        return ZOO_IOI
    names = require("ioi", tokenizer, "names", one_token_words(tokenizer, NAMES + EXTRA_NAMES),
                    len(NAMES + EXTRA_NAMES), 5)
    places = require("ioi", tokenizer, "places", one_token_words(tokenizer, PLACES + EXTRA_PLACES),
                     len(PLACES + EXTRA_PLACES), 1)
    objects = require("ioi", tokenizer, "objects", one_token_words(tokenizer, OBJECTS + EXTRA_OBJECTS),
                      len(OBJECTS + EXTRA_OBJECTS), 1)
    templates = tuple(i for i, t in enumerate(ALL_IOI_TEMPLATES)
                      if not has_unknown(tokenizer, t.format(A=names[0], B=names[1], S=names[1], PLACE=places[0],
                                                              OBJECT=objects[0])))
    if not templates:
        raise ValueError(f"ioi: every template has words unknown to tokenizer {tokenizer_label(tokenizer)}")
    return IOIVocab(names, places, objects, templates)


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
        return ALL_IOI_TEMPLATES[self.template].format(A=a, B=b, S=s, PLACE=self.place, OBJECT=self.obj)

    @property
    def clean(self) -> str:
        a, b = (self.io, self.s) if self.abba else (self.s, self.io)
        return self.text(a, b, self.s)

    @property
    def corrupt(self) -> str:
        return self.text(*self.corrupt_names)

    def pair(self) -> PromptPair:
        return PromptPair(clean=self.clean, corrupt=self.corrupt, answer=" " + self.io, wrong=" " + self.s)


def sample_ioi(rng: random.Random, vocab: IOIVocab = ZOO_IOI) -> IOIExample:
    """Draw one IOI example (ABBA or BABA with equal probability) from ``rng``."""
    picked = rng.sample(vocab.names, 5)
    return IOIExample(template=vocab.templates[rng.randrange(len(vocab.templates))], io=picked[0], s=picked[1],
                      abba=rng.random() < 0.5, place=rng.choice(vocab.places), obj=rng.choice(vocab.objects),
                      corrupt_names=(picked[2], picked[3], picked[4]))


def ioi(n: int = 64, seed: int = 0, tokenizer: Any | None = None) -> Task:
    """IOI prompts (ABBA and BABA) with ABC corruptions; answer = indirect object, wrong = subject."""
    vocab = ioi_vocab(tokenizer)
    rng = random.Random(seed)
    pairs = draw_pairs("ioi", n, lambda: sample_ioi(rng, vocab).pair(), tokenizer)
    return Task(name="ioi", pairs=pairs, metric="logit_diff", source=f"generator:ioi seed={seed} n={n}")
