"""MLP neurons as units: ``m{L}.n{I}`` read at ``blocks.L.mlp.hook_post`` (the input of ``W_out``).

The hook's activations *are* the neuron activations, so ``encode`` and ``decode`` are the identity (a spliced
neuron basis has a zero error term); a neuron's write direction into the residual stream is its row of
``W_out`` (``write_directions(model) = W_out``), the neuron's output weight vector.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explainers.bases.base import UnitBasis, register_basis
from explainers.units import NEURON_HOOK


@register_basis("neurons")
class NeuronBasis(UnitBasis):
    kind = "neuron"

    def __init__(self, layer: int, d_mlp: int, *, model: str = "", name: str = "") -> None:
        super().__init__(NEURON_HOOK.format(L=layer), model=model, name=name)
        if d_mlp < 1:
            raise ValueError(f"NeuronBasis: d_mlp must be >= 1, got {d_mlp}")
        self._d = int(d_mlp)
        self._eye: Tensor | None = None

    @classmethod
    def from_model(cls, model: Any, layer: int, *, model_name: str = "", name: str = "") -> NeuronBasis:
        """The neurons of ``model``'s MLP in ``layer`` (one-line error when that block has no MLP)."""
        n_layers = len(model.blocks)
        if not 0 <= layer < n_layers:
            raise ValueError(f"NeuronBasis: layer {layer} out of range 0..{n_layers - 1}")
        mlp = model.blocks[layer]._modules.get("mlp")
        if mlp is None or f"blocks.{layer}.mlp.hook_post" not in model.hook_dict:
            raise ValueError(f"NeuronBasis: block {layer} of this model has no MLP with a hook_post")
        return cls(layer, int(mlp.W_out.shape[0]), model=model_name, name=name)

    @property
    def n_units(self) -> int:
        return self._d

    @property
    def d_in(self) -> int:
        return self._d

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return acts

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return units

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        if self._eye is None:
            self._eye = torch.eye(self._d)
        return self._eye

    @property
    def bias(self) -> Float[Tensor, " d"]:
        return torch.zeros(self._d)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layer": self.layer}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> NeuronBasis:
        return cls(int(config["layer"]), int(config["d_in"]), model=config.get("model", ""),
                   name=config.get("name", ""))
