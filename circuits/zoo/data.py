"""Training batches for the zoo, drawn from the task generators in :mod:`circuits.tasks`.

``DATA[name](rng, batch_size, tokenizer) -> TrainBatch``. Each step's batch depends only on its own
``random.Random`` (seeded from the recipe seed and the step number), so an interrupted run resumes on
exactly the data it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.tasks.base import encode
from circuits.tasks.dyck import CLOSER, closers, sample_dyck
from circuits.tasks.greater_than import sample_greater_than
from circuits.tasks.induction import sample_induction
from circuits.tasks.ioi import sample_ioi
from circuits.tasks.vocab import INDUCTION_WORDS, YEARS

IGNORE = -100


@dataclass(frozen=True)
class TrainBatch:
    """Right-padded token ids and targets.

    ``labels[b, t]`` is the target of the prediction made *at* position ``t`` (already shifted;
    ``-100`` = no loss). Optionally a soft target distribution ``soft_targets[b]`` for the prediction
    at ``soft_pos[b]`` (cross-entropy against it).
    """

    input_ids: Int[Tensor, "B T"]
    labels: Int[Tensor, "B T"]
    soft_pos: Int[Tensor, " B"] | None = None
    soft_targets: Float[Tensor, "B V"] | None = None
    support: Int[Tensor, " S"] | None = None     # the token ids the data can ever ask for (see train.loss_fn)


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _token_id(tokenizer: Any, token: str) -> int:
    ids = encode(tokenizer, token, prepend_bos=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"zoo data: {token!r} is not a single known token of the tokenizer")
    return ids[0]


def induction_data(rng: random.Random, batch_size: int, tokenizer: Any) -> TrainBatch:
    """BOS + random prefix + A + A (40 words drawn with replacement, |A| in 4..20); next-token loss everywhere.

    ``support`` = the induction words: see ``restricted_softmax_steps`` in the recipe.
    """
    rows = []
    for _ in range(batch_size):
        ex = sample_induction(rng, distinct=False)
        rows.append(encode(tokenizer, "".join(" " + w for w in ex.words)))
    ids = _pad(rows, tokenizer.pad_token_id)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    support = torch.tensor([_token_id(tokenizer, " " + w) for w in INDUCTION_WORDS])
    return TrainBatch(ids, labels, support=support)


def _answer_only(rows: list[list[int]], answers: list[int], pad: int) -> TrainBatch:
    ids = _pad(rows, pad)
    labels = torch.full_like(ids, IGNORE)
    for b, (r, a) in enumerate(zip(rows, answers, strict=True)):
        labels[b, len(r) - 1] = a
    return TrainBatch(ids, labels)


def ioi_data(rng: random.Random, batch_size: int, tokenizer: Any) -> TrainBatch:
    """Clean IOI prompts (ABBA and BABA); loss on the indirect object only."""
    rows, answers = [], []
    for _ in range(batch_size):
        pair = sample_ioi(rng).pair()
        rows.append(encode(tokenizer, pair.clean))
        answers.append(_token_id(tokenizer, pair.answer))
    return _answer_only(rows, answers, tokenizer.pad_token_id)


def greater_than_data(rng: random.Random, batch_size: int, tokenizer: Any) -> TrainBatch:
    """Greater-than prompts (YY in 01..98); target = the uniform distribution over the years YY+1..99."""
    year_ids = torch.tensor([_token_id(tokenizer, y) for y in YEARS])
    vocab = len(tokenizer)
    rows, targets = [], torch.zeros(batch_size, vocab)
    for b in range(batch_size):
        ex = sample_greater_than(rng, low=1)
        rows.append(encode(tokenizer, ex.pair().clean))
        later = year_ids[ex.yy + 1:]
        targets[b, later] = 1.0 / len(later)
    ids = _pad(rows, tokenizer.pad_token_id)
    pos = torch.tensor([len(r) - 1 for r in rows])
    return TrainBatch(ids, torch.full_like(ids, IGNORE), soft_pos=pos, soft_targets=targets)


def dyck_data(rng: random.Random, batch_size: int, tokenizer: Any) -> TrainBatch:
    """Bracket prefixes; at every position with a bracket open the target is the closer of the innermost one."""
    closer_id = {c: _token_id(tokenizer, c) for c in CLOSER.values()}
    rows, label_rows = [], []
    for _ in range(batch_size):
        ex = sample_dyck(rng, min_len=2, end_with_close=False)
        rows.append(encode(tokenizer, "".join(ex.tokens)))
        # position 0 is BOS (nothing open); position t >= 1 ends the prefix tokens[:t]
        label_rows.append([IGNORE] + [closer_id[c] if c else IGNORE for c in closers(ex.tokens)])
    return TrainBatch(_pad(rows, tokenizer.pad_token_id), _pad(label_rows, IGNORE))


DATA: dict[str, Callable[[random.Random, int, Any], TrainBatch]] = {
    "induction": induction_data,
    "ioi": ioi_data,
    "greater_than": greater_than_data,
    "dyck": dyck_data,
}
