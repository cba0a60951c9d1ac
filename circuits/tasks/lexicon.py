"""Fitting the task generators to a tokenizer: one-token word filters and checked pair drawing.

Generators take ``tokenizer=None`` (the zoo's word lists, exactly as before) or a real tokenizer. With a
tokenizer they keep the words (names, places, objects, induction words) that are *one token with their
leading space* and not the unknown token, so that

* clean and corrupted prompts, which differ only in such words, tokenize to the same length;
* every prompt of one template has its names, place and object at the same token positions
  (per-position mean ablations need that);
* answers (`` Mary``) are single tokens.

:func:`draw_pairs` then draws pairs and checks each one against the tokenizer (equal lengths; answer and
wrong single, known and different tokens), redrawing a pair that fails; if most draws fail, or a word
list is too short, the generator refuses in one line naming the tokenizer and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from circuits.tasks.base import PromptPair, encode

#: Draws allowed per requested pair before a generator gives up on a tokenizer.
MAX_DRAWS_PER_PAIR = 20


def tokenizer_label(tokenizer: Any) -> str:
    """A short name for messages: the tokenizer's ``name_or_path`` (or its class)."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return encode(tokenizer, text, prepend_bos=False)


def is_one_token(tokenizer: Any, text: str) -> bool:
    """True when ``text`` is exactly one token and not the unknown token."""
    ids = token_ids(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and (unk is None or ids[0] != unk or text.strip() == getattr(tokenizer, "unk_token", None))


def has_unknown(tokenizer: Any, text: str) -> bool:
    """True when some part of ``text`` maps to the unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and unk in token_ids(tokenizer, text)


def one_token_words(tokenizer: Any, words: Iterable[str], prefix: str = " ") -> tuple[str, ...]:
    """The words (order kept, duplicates dropped) for which ``prefix + word`` is one known token."""
    return tuple(w for w in dict.fromkeys(words) if is_one_token(tokenizer, prefix + w))


def require(task: str, tokenizer: Any, what: str, kept: tuple[str, ...], total: int, need: int) -> tuple[str, ...]:
    """``kept`` if it has at least ``need`` entries, else a one-line ``ValueError`` for ``task``."""
    if len(kept) < need:
        raise ValueError(f"{task}: only {len(kept)} of {total} {what} are one token (with a leading space) for "
                         f"tokenizer {tokenizer_label(tokenizer)}; need at least {need}")
    return kept


def pair_problem(tokenizer: Any, pair: PromptPair) -> str | None:
    """Why ``pair`` is not a valid pair for ``tokenizer`` (``None`` when it is)."""
    c, k = token_ids(tokenizer, pair.clean), token_ids(tokenizer, pair.corrupt)
    if len(c) != len(k):
        return f"clean and corrupt tokenize to {len(c)} and {len(k)} tokens ({pair.clean!r} / {pair.corrupt!r})"
    for field in ("answer", "wrong"):
        if not is_one_token(tokenizer, getattr(pair, field)):
            return f"{field} {getattr(pair, field)!r} is not one token"
    if token_ids(tokenizer, pair.answer) == token_ids(tokenizer, pair.wrong):
        return f"answer and wrong are the same token ({pair.answer!r})"
    if has_unknown(tokenizer, pair.clean) or has_unknown(tokenizer, pair.corrupt):
        return f"prompt has words unknown to the tokenizer ({pair.clean!r})"
    return None


def draw_pairs(task: str, n: int, draw: Callable[[], PromptPair], tokenizer: Any | None) -> tuple[PromptPair, ...]:
    """``n`` pairs from ``draw()``; with a tokenizer, pairs that fail :func:`pair_problem` are redrawn.

    Without a tokenizer every draw is kept (the zoo behaviour, unchanged). A one-line ``ValueError`` when
    more than ``MAX_DRAWS_PER_PAIR * n`` draws were needed, naming the first problem met.
    """
    if tokenizer is None:
        return tuple(draw() for _ in range(n))
    pairs: list[PromptPair] = []
    first: str | None = None
    for _ in range(MAX_DRAWS_PER_PAIR * max(n, 1)):
        if len(pairs) == n:
            break
        p = draw()
        why = pair_problem(tokenizer, p)
        if why is None:
            pairs.append(p)
        elif first is None:
            first = why
    if len(pairs) < n:
        raise ValueError(f"{task}: cannot build valid prompt pairs for tokenizer {tokenizer_label(tokenizer)}: "
                         f"{first}")
    return tuple(pairs)


__all__ = ["one_token_words", "is_one_token", "has_unknown", "token_ids", "require", "pair_problem", "draw_pairs",
           "tokenizer_label", "MAX_DRAWS_PER_PAIR"]
