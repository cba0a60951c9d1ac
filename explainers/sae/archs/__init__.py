"""Training behaviour of each SAE architecture, one file each (see :mod:`explainers.sae.archs.base`)."""

from explainers.sae.archs import batchtopk, jumprelu, relu_l1, topk  # noqa: F401  (register)
from explainers.sae.archs.base import TRAIN_ARCHS, StepContext, TrainArch

__all__ = ["TRAIN_ARCHS", "StepContext", "TrainArch"]
