"""Sparse autoencoders: the model (:mod:`.model`), training (:mod:`.train`, :mod:`.archs`) and SAELens-layout I/O
(:mod:`.io`)."""

from explainers.sae.io import load_sae, save_sae
from explainers.sae.model import ARCHS, CENTRINGS, SAE, SAEConfig
from explainers.sae.train import StoreSource, TensorSource, TrainConfig, train_sae

__all__ = ["ARCHS", "CENTRINGS", "SAE", "SAEConfig", "TrainConfig", "train_sae", "StoreSource", "TensorSource",
           "load_sae", "save_sae"]
