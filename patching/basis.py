"""The minimal protocol the engine needs from a set of units read at one hook (a *basis*).

A basis maps the activations at one TransformerLens hook to unit activations and back:

- ``encode(acts[..., d]) -> units[..., n]`` (any function: ReLU, TopK, JumpReLU, a projection, the identity);
- ``decode(units[..., n]) -> acts[..., d]`` is **affine**: ``decode(u) = u @ directions + bias``, so each unit
  contributes ``activation x its direction`` (Marks et al. 2024, *Sparse Feature Circuits*) and the engine can
  represent a unit's effect in that low-rank form;
- ``directions[n, d]`` (the decoder rows, in the hook's own space) and ``bias[d]`` (``decode(0)``).

``d`` is the hook's last dimension; for ``blocks.L.attn.hook_z`` (``[..., n_heads, d_head]``) it is the flattened
``n_heads * d_head`` (SAELens' ``hook_z`` convention). Implementations live in ``explainers/`` (neurons, directions,
SAE features); :mod:`patching.splice` splices any of them into a model with an error term.
A basis that can only be read (``decodable = False``, e.g. attention heads read as output norms) is refused by
the splice.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class Basis(Protocol):
    """A set of ``n_units`` units read at ``hook`` from ``d_in``-dimensional activations."""

    hook: str

    @property
    def n_units(self) -> int: ...

    @property
    def d_in(self) -> int: ...

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]: ...

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]: ...

    @property
    def directions(self) -> Float[Tensor, "n d"]: ...

    @property
    def bias(self) -> Float[Tensor, " d"]: ...


def check_basis(basis: object, hook: str | None = None) -> Basis:
    """``basis`` if it implements :class:`Basis` (at ``hook`` when given), else a one-line ``TypeError`` /
    ``ValueError`` naming what is missing."""
    names = set(dir(basis))  # dir() does not evaluate properties
    missing = [a for a in ("hook", "n_units", "d_in", "encode", "decode", "directions", "bias") if a not in names]
    if missing:
        raise TypeError(f"{type(basis).__name__} is not a basis: it lacks {', '.join(missing)}")
    if hook is not None and basis.hook != hook:  # type: ignore[attr-defined]
        raise ValueError(f"basis {type(basis).__name__} reads {basis.hook!r} but was given for hook {hook!r}")  # type: ignore[attr-defined]
    return basis  # type: ignore[return-value]
