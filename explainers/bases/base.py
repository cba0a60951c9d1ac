"""The unit-basis protocol of the explainers: a set of units read at one hook, with stable ids.

:class:`UnitBasis` implements the engine's :class:`patching.basis.Basis` (``encode``, affine ``decode``,
``directions``, ``bias``, ``hook``) and adds what explanations and steering need:

- ``unit_id(i)`` / ``unit_ids()``: stable :class:`explainers.units.UnitId` per unit (model, hook, basis, index);
- ``write_directions(model)``: each unit's write direction into the residual stream (``[n, d_model]``), for
  vocabulary projection (logit lens) and steering. In the hook's own space a unit's direction is its decoder
  row (``directions``); :func:`to_residual` maps it through ``W_out`` (MLP neurons, ``mlp.hook_post``) or
  ``W_O`` (``attn.hook_z``), and leaves residual-space hooks (``resid_pre/mid/post``, ``attn_out``,
  ``mlp_out``) unchanged;
- ``save(dir)`` / :func:`explainers.bases.load_basis` (one registry of basis types).
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from explainers.units import UnitId, hook_layer, parse_unit_id

BASIS_JSON = "basis.json"
BASIS_WEIGHTS = "basis.safetensors"
#: Hooks whose activations live in the residual stream's space (a unit's direction there is its write direction).
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_in", "hook_out", "hook_attn_out",
                  "hook_mlp_out")

BASES: dict[str, type[UnitBasis]] = {}


def register_basis(name: str):
    """Class decorator: put a basis type in :data:`BASES` under ``name`` (the ``type`` in ``basis.json``)."""

    def deco(cls: type[UnitBasis]) -> type[UnitBasis]:
        if name in BASES:
            raise ValueError(f"basis type {name!r} registered twice")
        cls.type_name = name
        BASES[name] = cls
        return cls

    return deco


def to_residual(model: Any, hook: str, vectors: Float[Tensor, "n d"]) -> Float[Tensor, "n d_model"]:
    """Map vectors in ``hook``'s activation space to the residual-stream vectors they write (see module doc).

    Biases (``b_out``, ``b_O``) are not added: these are per-unit directions, not activations.
    """
    L = hook_layer(hook)
    last = hook.split(".")[-1]
    d_model = int(model.cfg.d_model)
    if L is not None and hook == f"blocks.{L}.mlp.hook_post":
        W = model.blocks[L].mlp.W_out.detach()
        return vectors.to(W.dtype) @ W
    if L is not None and hook == f"blocks.{L}.attn.hook_z":
        W_O = model.blocks[L].attn.W_O.detach()                       # [H, d_head, d_model]
        v = vectors.to(W_O.dtype).reshape(vectors.shape[0], W_O.shape[0], W_O.shape[1])
        return torch.einsum("nhd,hdm->nm", v, W_O)
    residual = (L is not None and hook == f"blocks.{L}.{last}" and last in RESIDUAL_HOOKS) or \
        hook in ("hook_embed", "hook_pos_embed", "ln_final.hook_in") or \
        (L is not None and hook in (f"blocks.{L}.attn.hook_out", f"blocks.{L}.mlp.hook_out"))
    if residual:
        if vectors.shape[-1] != d_model:
            raise ValueError(f"{hook}: vectors of size {vectors.shape[-1]} are not residual-stream vectors "
                             f"(d_model {d_model})")
        return vectors
    raise ValueError(f"no known map from hook {hook!r} to the residual stream (known: mlp.hook_post, attn.hook_z "
                     f"and residual-space hooks {', '.join(RESIDUAL_HOOKS)})")


class UnitBasis(abc.ABC):
    """Base class of the bases in :data:`BASES` (see the module docstring)."""

    kind: ClassVar[str]           # UnitId kind of its units
    type_name: ClassVar[str]      # set by register_basis
    decodable: ClassVar[bool] = True

    def __init__(self, hook: str, *, model: str = "", name: str = "") -> None:
        self.hook = hook
        self.model = model
        self.name = name
        layer = hook_layer(hook)
        if layer is None:
            raise ValueError(f"{type(self).__name__}: units live at block hooks (blocks.L.…), not {hook!r}")
        self.layer = layer

    # -- the engine's protocol -------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def n_units(self) -> int: ...

    @property
    @abc.abstractmethod
    def d_in(self) -> int: ...

    @abc.abstractmethod
    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]: ...

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return units @ self.directions + self.bias

    @property
    @abc.abstractmethod
    def directions(self) -> Float[Tensor, "n d"]: ...

    @property
    @abc.abstractmethod
    def bias(self) -> Float[Tensor, " d"]: ...

    # -- units -----------------------------------------------------------------------------------------------
    def unit_id(self, i: int) -> UnitId:
        if not 0 <= i < self.n_units:
            raise IndexError(f"{self.describe()}: unit index {i} out of range 0..{self.n_units - 1}")
        return UnitId(self.kind, self.layer, int(i), self.hook, self.name, self.model)

    def unit_ids(self) -> list[UnitId]:
        return [self.unit_id(i) for i in range(self.n_units)]

    def index_of(self, unit: UnitId | str) -> int:
        """The index of ``unit`` (an id or its string) in this basis; one-line ``ValueError`` if it is not one."""
        u = parse_unit_id(unit) if isinstance(unit, str) else unit
        if u.kind != self.kind or u.hook != self.hook or (u.basis and u.basis != self.name) or \
                (u.model and self.model and u.model != self.model) or u.index is None or u.index >= self.n_units:
            raise ValueError(f"unit {u} is not a unit of {self.describe()}")
        return u.index

    def write_directions(self, model: Any) -> Float[Tensor, "n d_model"]:
        """Each unit's write direction into the residual stream (:func:`to_residual` of its decoder row)."""
        return to_residual(model, self.hook, self.directions)

    def describe(self) -> str:
        return f"{self.type_name} basis {self.name or '(unnamed)'} at {self.hook} ({self.n_units} units)"

    # -- storage ---------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able description (``basis.json``); subclasses add their fields."""
        return {"type": self.type_name, "hook": self.hook, "model": self.model, "name": self.name,
                "n_units": self.n_units, "d_in": self.d_in}

    def tensors(self) -> dict[str, Tensor]:
        """Tensors saved next to ``basis.json``."""
        return {}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``basis.json`` and ``basis.safetensors`` into directory ``path`` (atomically, file by file)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        tmp = d / (BASIS_WEIGHTS + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, d / BASIS_WEIGHTS)
        tmp = d / (BASIS_JSON + ".tmp")
        tmp.write_text(json.dumps(self.config(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, d / BASIS_JSON)
        return d

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> UnitBasis:
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from disk")


def read_saved(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    d = Path(path)
    f = d / BASIS_JSON
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no {BASIS_JSON} (not a saved basis)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    w = d / BASIS_WEIGHTS
    return cfg, (load_file(str(w)) if w.is_file() else {})
