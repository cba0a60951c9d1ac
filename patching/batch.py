"""Token batches the engine runs on.

The engine knows nothing of tasks: a :class:`TaskBatch` is just token tensors. Prompts are
right-padded; ``pos`` is the index of the position whose next-token prediction the metric reads
(the last real token of each prompt). With causal models right padding needs no attention mask:
positions up to ``pos`` never see the pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """Clean and corrupted prompts with the answer to score, as token ids.

    Attributes:
        clean: ``[B, P]`` token ids of the clean prompts (right-padded).
        corrupt: ``[B, P]`` token ids of the corrupted prompts; same length as ``clean`` per row.
        answer: ``[B]`` the correct next token.
        wrong: ``[B]`` the contrasting wrong token (for logit / probability differences).
        pos: ``[B]`` the position whose next-token logits the metric reads.
    """

    clean: Int[Tensor, "B P"]
    corrupt: Int[Tensor, "B P"]
    answer: Int[Tensor, " B"]
    wrong: Int[Tensor, " B"]
    pos: Int[Tensor, " B"]

    def __post_init__(self) -> None:
        b, p = self.clean.shape
        if self.corrupt.shape != (b, p):
            raise ValueError(f"TaskBatch: corrupt shape {tuple(self.corrupt.shape)} != clean shape {(b, p)}")
        for name in ("answer", "wrong", "pos"):
            t = getattr(self, name)
            if t.shape != (b,):
                raise ValueError(f"TaskBatch: {name} has shape {tuple(t.shape)}, expected ({b},)")
        if len(self.pos) and (int(self.pos.min()) < 0 or int(self.pos.max()) >= p):
            raise ValueError(f"TaskBatch: pos out of range [0, {p})")

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def device(self) -> torch.device:
        return self.clean.device

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(getattr(self, f).to(device) for f in ("clean", "corrupt", "answer", "wrong", "pos")))

    def __getitem__(self, idx: slice | Tensor) -> TaskBatch:
        return TaskBatch(*(getattr(self, f)[idx] for f in ("clean", "corrupt", "answer", "wrong", "pos")))

    def split(self, size: int) -> list[TaskBatch]:
        return [self[i : i + size] for i in range(0, len(self), size)]
