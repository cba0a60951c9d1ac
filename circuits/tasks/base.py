"""Tasks: clean / corrupted prompt pairs with a correct and a wrong answer, and a metric.

A task is pure data (frozen dataclasses). :meth:`Task.batch` tokenizes it for one model into the
engine's :class:`patching.batch.TaskBatch`. Answers must be single tokens of the model's tokenizer:
multi-token answers are rejected with an error naming the pair (score a multi-token answer by its
first token by writing only that token as the answer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from patching.batch import TaskBatch
from patching.metrics import METRICS


@dataclass(frozen=True)
class PromptPair:
    """One clean prompt, its corrupted twin, and the answer tokens (strings) to contrast."""

    clean: str
    corrupt: str
    answer: str
    wrong: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptPair:
        return cls(clean=d["clean"], corrupt=d["corrupt"], answer=d["answer"], wrong=d["wrong"])


@dataclass(frozen=True)
class Task:
    """A named set of prompt pairs and the metric that scores them.

    Attributes:
        name: task name (``ioi``, ``induction``, or a file's stem).
        pairs: the prompt pairs.
        metric: name of a metric in :data:`patching.metrics.METRICS`.
        source: where the pairs came from (``generator:ioi seed=0 n=64`` or a file path), for provenance.
        sources: per-pair origin (``file.jsonl:12``) used in error messages; empty for generated tasks.
    """

    name: str
    pairs: tuple[PromptPair, ...]
    metric: str = "logit_diff"
    source: str = ""
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; choose one of {sorted(METRICS)}")
        if not self.pairs:
            raise ValueError(f"task {self.name!r} has no prompt pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def where(self, i: int) -> str:
        return self.sources[i] if i < len(self.sources) else f"{self.name}[{i}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "source": self.source,
                "pairs": [p.to_dict() for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(name=d["name"], pairs=tuple(PromptPair.from_dict(p) for p in d["pairs"]),
                   metric=d.get("metric", "logit_diff"), source=d.get("source", ""))

    def batch(self, tokenizer: Any, device: torch.device | str = "cpu", prepend_bos: bool = True) -> TaskBatch:
        """Tokenize every pair into a right-padded :class:`TaskBatch`.

        Raises ``ValueError`` naming the pair's origin when clean and corrupt tokenize to different
        lengths or an answer is not exactly one token.
        """
        clean, corrupt, answer, wrong, pos = [], [], [], [], []
        for i, p in enumerate(self.pairs):
            c = encode(tokenizer, p.clean, prepend_bos)
            k = encode(tokenizer, p.corrupt, prepend_bos)
            if len(c) != len(k):
                raise ValueError(f"{self.where(i)}: clean and corrupt tokenize to different lengths "
                                 f"({len(c)} vs {len(k)} tokens)")
            a = single_token(tokenizer, p.answer, f"{self.where(i)}: answer")
            w = single_token(tokenizer, p.wrong, f"{self.where(i)}: wrong")
            clean.append(c)
            corrupt.append(k)
            answer.append(a)
            wrong.append(w)
            pos.append(len(c) - 1)
        width = max(len(c) for c in clean)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def pad_to(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)

        return TaskBatch(pad_to(clean), pad_to(corrupt), torch.tensor(answer), torch.tensor(wrong),
                         torch.tensor(pos)).to(device)


def encode(tokenizer: Any, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text`` without special tokens, with the BOS token in front if asked."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def single_token(tokenizer: Any, text: str, where: str) -> int:
    """The id of ``text`` if it is exactly one token, else a ``ValueError`` naming ``where``."""
    ids = encode(tokenizer, text, prepend_bos=False)
    if len(ids) != 1:
        raise ValueError(f"{where} {text!r} is {len(ids)} tokens {ids}; answers must be a single token")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text.strip() != getattr(tokenizer, "unk_token", None):
        raise ValueError(f"{where} {text!r} is not in the model's vocabulary (maps to the unknown token)")
    return ids[0]
