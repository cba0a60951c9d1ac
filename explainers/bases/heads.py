"""Attention heads as units: ``a{L}.h{H}`` read at their output.

A head's output at a position is the vector ``z_h @ W_O[h]`` (``z`` at ``blocks.L.attn.hook_z``); as a unit with
one activation per token it is read as that vector's norm, ``||z_h W_O[h]||`` (how much the head writes there),
which is what exemplars and activation-based scores use. A norm cannot be decoded, so this basis is read-only
(``decodable = False``): :func:`patching.splice.splice` refuses it, and heads are patched as the engine's own
``a{L}.h{H}`` nodes. A head writes a subspace, not one direction: ``write_matrices(model)`` gives ``W_O``
(``[H, d_head, d_model]``) for its OV circuit; ``write_directions`` gives each head's top right-singular vector
of ``W_O[h]`` (the direction it writes most strongly), for a one-direction summary.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explainers.bases.base import UnitBasis, register_basis
from explainers.units import HEAD_HOOK


@register_basis("heads")
class HeadBasis(UnitBasis):
    kind = "head"
    decodable = False

    def __init__(self, layer: int, W_O: Float[Tensor, "H d_head d_model"], *, model: str = "",
                 name: str = "") -> None:
        super().__init__(HEAD_HOOK.format(L=layer), model=model, name=name)
        if W_O.dim() != 3:
            raise ValueError(f"HeadBasis: W_O must be [n_heads, d_head, d_model], got shape {tuple(W_O.shape)}")
        self.W_O = W_O.detach().clone()

    @classmethod
    def from_model(cls, model: Any, layer: int, *, model_name: str = "", name: str = "") -> HeadBasis:
        n_layers = len(model.blocks)
        if not 0 <= layer < n_layers:
            raise ValueError(f"HeadBasis: layer {layer} out of range 0..{n_layers - 1}")
        attn = model.blocks[layer]._modules.get("attn")
        if attn is None or f"blocks.{layer}.attn.hook_z" not in model.hook_dict:
            raise ValueError(f"HeadBasis: block {layer} of this model has no attention with a hook_z")
        return cls(layer, attn.W_O, model=model_name, name=name)

    @property
    def n_units(self) -> int:
        return int(self.W_O.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_O.shape[0] * self.W_O.shape[1])

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        H, dh, _ = self.W_O.shape
        z = acts.reshape(*acts.shape[:-1], H, dh) if acts.shape[-1] == H * dh else acts
        if z.shape[-2:] != (H, dh):
            raise ValueError(f"HeadBasis at {self.hook}: expected hook_z activations [..., {H}, {dh}] or "
                             f"[..., {H * dh}], got {tuple(acts.shape)}")
        out = torch.einsum("...hd,hdm->...hm", z.to(self.W_O.dtype), self.W_O)
        return out.norm(dim=-1)

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        raise ValueError(f"{self.describe()}: heads are read as output norms and cannot be decoded; patch them as "
                         f"the engine's a{self.layer}.h* nodes instead")

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        raise ValueError(f"{self.describe()}: a head writes a subspace (write_matrices), not one direction in "
                         "hook_z space")

    @property
    def bias(self) -> Float[Tensor, " d"]:
        return torch.zeros(self.d_in)

    def write_matrices(self, model: Any | None = None) -> Float[Tensor, "H d_head d_model"]:
        """``W_O`` per head: the subspace each head writes (its OV circuit's output side)."""
        return self.W_O

    def write_directions(self, model: Any | None = None) -> Float[Tensor, "n d_model"]:
        """Each head's top right-singular vector of ``W_O[h]``, sign chosen so its largest entry is positive."""
        _, _, Vh = torch.linalg.svd(self.W_O.double(), full_matrices=False)
        top = Vh[:, 0, :]
        sign = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
        return (top * sign).to(self.W_O.dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layer": self.layer}

    def tensors(self) -> dict[str, Tensor]:
        return {"W_O": self.W_O}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> HeadBasis:
        return cls(int(config["layer"]), tensors["W_O"], model=config.get("model", ""), name=config.get("name", ""))
