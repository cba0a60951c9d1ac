"""What an SAE architecture does in training: its activation with gradients, its sparsity loss, its constraints.

One class per architecture (one file each), registered in :data:`TRAIN_ARCHS`. The trainer
(:mod:`explainers.sae.train`) computes ``loss = ||x - x_hat||^2 (summed over d, mean over the batch) +
sum(arch.losses(...).values())`` on inputs scaled to ``E||x|| = sqrt(d_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from explainers.sae.model import SAE


@dataclass
class StepContext:
    """What a loss may depend on besides the batch: training progress, dead latents, the config."""

    step: int
    n_steps: int
    dead: Bool[Tensor, " n"]      # latents that have not fired in the last dead_tokens training tokens
    cfg: Any                      # explainers.sae.train.TrainConfig

    def warmup(self, fraction: float) -> float:
        """Linear ramp 0 -> 1 over the first ``fraction`` of the steps (1 when ``fraction`` is 0)."""
        n = fraction * self.n_steps
        return 1.0 if n <= 0 else min(1.0, (self.step + 1) / n)


class TrainArch:
    name: ClassVar[str]
    saelens_architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True     # decoder rows kept at unit norm (gradient projected, renormalised)
    decoder_init_norm: ClassVar[float] = 1.0

    def setup(self, sae: SAE, cfg: Any) -> None:
        """Create training-only parameters (called before weights are initialised or loaded)."""

    def forward(self, sae: SAE, x: Float[Tensor, "B d"], ctx: StepContext
                ) -> tuple[Float[Tensor, "B n"], Float[Tensor, "B n"]]:
        """Training activations ``f`` (with the gradients the method prescribes) and pre-activations."""
        raise NotImplementedError

    def losses(self, sae: SAE, x: Tensor, x_hat: Tensor, f: Tensor, pre: Tensor,
               ctx: StepContext) -> dict[str, Tensor]:
        """Loss terms added to the reconstruction loss."""
        return {}

    @torch.no_grad()
    def finalize(self, sae: SAE, batches: list[Tensor], cfg: Any) -> dict[str, float]:
        """Turn the training SAE into its inference form (e.g. thresholds); returns facts to record."""
        return {}


TRAIN_ARCHS: dict[str, TrainArch] = {}


def register_arch(cls: type[TrainArch]) -> type[TrainArch]:
    TRAIN_ARCHS[cls.name] = cls()
    return cls
