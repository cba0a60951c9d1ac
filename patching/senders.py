"""Sender families: one class per kind of unit that writes into the model (Marks et al. 2024 §2; auto-circuit).

A *sender family* is a set of units read at one TransformerLens hook. Each family knows

* ``hook``: where its units live (the activation the hook sees, flattened to ``[..., d]`` for ``hook_z``);
* ``read(x) -> [..., n]``: the units' activations given the hook's activation;
* ``write(coef) -> [..., d]``: the change of the hook's activation when the units' activations change by
  ``coef`` (``[..., n]``). Every family here is *affine* in its units, so an ablation's effect on the
  hook is ``write(ablated - current)``: for features this is the low-rank product ``coef @ W_dec[cand]``,
  never a dense ``d``-dimensional tensor per mask and unit;
* ``directions [n, d]``: each unit's write direction in the hook's space.

Families:

=====================  ======================================  ============================================
class                  units                                   write
=====================  ======================================  ============================================
:class:`FeatureFamily`  candidate features of a basis (an SAE)  ``coef @ directions[cand]`` (decoder rows)
:class:`ErrorFamily`    the basis' reconstruction error, 1 unit ``delta`` itself (a ``d``-vector per position)
:class:`NeuronFamily`   MLP neurons at ``mlp.hook_post``        ``coef`` at the hook (``W_out`` rows downstream)
:class:`HeadFamily`     heads at ``attn.hook_z``                ``z_h`` per head (``W_O[h]`` downstream)
:class:`MLPFamily`      one MLP at ``hook_mlp_out``             ``delta`` itself
:class:`EmbedFamily`    ``hook_embed`` / ``hook_pos_embed``     ``delta`` itself
:class:`BlockFamily`    a recurrent block (``hook_out``)        ``delta`` (``hook_out - hook_in``)
=====================  ======================================  ============================================

The feature-circuit engine (:mod:`patching.features`) runs on :class:`FeatureFamily` / :class:`ErrorFamily`
(one :class:`SpliceSite` per spliced hook). The head / MLP engine's sender groups (``wiring.SenderGroup``) carry
their family (made by their unit kind, :mod:`patching.kinds`) and delegate to it the engine's *unit form*
(``units`` / ``from_units``: ``[N, P, n, f]``) and the residual write (``out_units``). docs/features.md says what
adding a kind of unit takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from patching.basis import Basis


@runtime_checkable
class SenderFamily(Protocol):
    """Units read at one hook that write into it affinely (module docstring)."""

    kind: str
    hook: str

    @property
    def n(self) -> int: ...

    def read(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]: ...

    def write(self, coef: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]: ...


@dataclass(frozen=True, eq=False)
class FeatureFamily:
    """The candidate features ``index`` of ``basis``: ``read`` encodes and selects, ``write`` is low rank."""

    hook: str
    basis: Basis
    index: Tensor  # [n] long: feature indices within the basis
    kind: str = "feature"

    @property
    def n(self) -> int:
        return int(self.index.numel())

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        W = self.basis.directions
        return W.index_select(0, self.index.to(W.device))

    def select(self, u_all: Float[Tensor, "... N"]) -> Float[Tensor, "... n"]:
        return u_all.index_select(-1, self.index.to(u_all.device))

    def read(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return self.select(self.basis.encode(x))

    def write(self, coef: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return coef @ self.directions.to(coef.dtype)


@dataclass(frozen=True, eq=False)
class ErrorFamily:
    """The reconstruction error ``x - decode(encode(x))`` of ``basis`` at ``hook``: one unit, a ``d``-vector."""

    hook: str
    basis: Basis
    kind: str = "error"

    @property
    def n(self) -> int:
        return 1

    def read(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return x - self.basis.decode(self.basis.encode(x))

    def write(self, delta: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return delta


@dataclass(frozen=True, eq=False)
class SpliceSite:
    """One spliced hook: its candidate features and its error term, read with one ``encode``."""

    features: FeatureFamily
    error: ErrorFamily

    @property
    def hook(self) -> str:
        return self.features.hook

    def read(self, x: Float[Tensor, "... d"]) -> tuple[Float[Tensor, "... n"], Float[Tensor, "... d"]]:
        """``(candidate activations, error)`` of activations ``x`` (``x = u_all @ W + b + err``)."""
        u_all = self.features.basis.encode(x)
        return self.features.select(u_all), x - self.features.basis.decode(u_all)

    def delta(self, feat_coef: Tensor | None, err_delta: Tensor | None) -> Tensor | None:
        """The hook's change for feature activation changes ``feat_coef [..., n]`` and error change ``[..., d]``."""
        out = None if feat_coef is None else self.features.write(feat_coef)
        if err_delta is not None:
            out = err_delta if out is None else out + err_delta
        return out


@dataclass(frozen=True, eq=False)
class NeuronFamily:
    """MLP neurons of one layer at ``blocks.L.mlp.hook_post`` (the engine's ``m{L}.n{I}``)."""

    hook: str
    W_out: Tensor | None  # [n, d_model] (None: the engine's groups, which never write through it)
    kind: str = "neuron"

    @classmethod
    def for_group(cls, kind: str, hook: str, *, W_O: Tensor | None = None, in_hook: str | None = None) -> NeuronFamily:
        return cls(hook, None)

    @property
    def n(self) -> int:
        return int(self.W_out.shape[0])

    def read(self, x: Tensor) -> Tensor:
        return x

    def write(self, coef: Tensor) -> Tensor:
        return coef

    def residual(self, coef: Tensor) -> Tensor:
        """Each neuron's write into the residual stream, ``[..., n, d_model]``."""
        return coef.unsqueeze(-1) * self.W_out.to(coef.dtype)

    # the engine's unit form (patching/wiring.py): [N, P, m, 1]; neurons are node-level only (no residual write)
    def units(self, x: Tensor, block_in: Tensor | None = None) -> Tensor:
        return x.unsqueeze(-1)

    def from_units(self, u: Tensor, block_in: Tensor | None = None) -> Tensor:
        return u.squeeze(-1)

    def out_units(self, u: Tensor, units: Tensor | None = None) -> Tensor:
        return _select(u, units)


@dataclass(frozen=True, eq=False)
class HeadFamily:
    """The heads of one layer at ``blocks.L.attn.hook_z`` (``[..., H, d_head]``)."""

    hook: str
    W_O: Tensor  # [H, d_head, d_model]
    kind: str = "head"

    @classmethod
    def for_group(cls, kind: str, hook: str, *, W_O: Tensor | None = None, in_hook: str | None = None) -> HeadFamily:
        return cls(hook, W_O)

    @property
    def n(self) -> int:
        return int(self.W_O.shape[0])

    def read(self, x: Tensor) -> Tensor:
        return x

    def write(self, coef: Tensor) -> Tensor:
        return coef

    def residual(self, z: Tensor) -> Tensor:
        """Each head's write into the residual stream ``z_h @ W_O[h]``, ``[..., H, d_model]``."""
        return torch.einsum("...hf,hfm->...hm", z, self.W_O.to(z.dtype))

    # the engine's unit form (patching/wiring.py): hook_z itself, [N, P, H, d_head]
    def units(self, x: Tensor, block_in: Tensor | None = None) -> Tensor:
        return x

    def from_units(self, u: Tensor, block_in: Tensor | None = None) -> Tensor:
        return u

    def out_units(self, u: Tensor, units: Tensor | None = None) -> Tensor:
        """Residual-stream output of each head (of the ``units`` indices only, when given), ``[..., n, d_model]``."""
        if units is not None:
            u = u.index_select(-2, units.to(u.device))
        W = self.W_O if units is None else self.W_O.index_select(0, units.to(self.W_O.device))
        return torch.einsum("...hf,hfm->...hm", u, W.to(u.device))


@dataclass(frozen=True, eq=False)
class MLPFamily:
    """One whole MLP at ``blocks.L.hook_mlp_out``: one unit whose write is its output."""

    hook: str
    kind: str = "mlp"

    @classmethod
    def for_group(cls, kind: str, hook: str, *, W_O: Tensor | None = None, in_hook: str | None = None) -> MLPFamily:
        return cls(hook, kind=kind)

    @property
    def n(self) -> int:
        return 1

    def read(self, x: Tensor) -> Tensor:
        return x

    def write(self, delta: Tensor) -> Tensor:
        return delta

    def residual(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2)

    # the engine's unit form (patching/wiring.py): one unit of d_model features, [N, P, 1, d]
    def units(self, x: Tensor, block_in: Tensor | None = None) -> Tensor:
        return x.unsqueeze(-2)

    def from_units(self, u: Tensor, block_in: Tensor | None = None) -> Tensor:
        return u.squeeze(-2)

    def out_units(self, u: Tensor, units: Tensor | None = None) -> Tensor:
        return _select(u, units)


@dataclass(frozen=True, eq=False)
class EmbedFamily(MLPFamily):
    """The token (``hook_embed``) or positional (``hook_pos_embed``) embedding: one unit, its output."""

    kind: str = "embed"


@dataclass(frozen=True, eq=False)
class BlockFamily:
    """A whole block of a recurrent model: one unit whose write is ``hook_out - hook_in`` (read at ``in_hook``)."""

    hook: str
    in_hook: str = ""
    kind: str = "block"

    @classmethod
    def for_group(cls, kind: str, hook: str, *, W_O: Tensor | None = None, in_hook: str | None = None) -> BlockFamily:
        return cls(hook, in_hook or "")

    @property
    def n(self) -> int:
        return 1

    def read(self, x: Tensor) -> Tensor:
        return x

    def write(self, delta: Tensor) -> Tensor:
        return delta

    def units(self, x: Tensor, block_in: Tensor | None = None) -> Tensor:
        return (x - block_in).unsqueeze(-2)

    def from_units(self, u: Tensor, block_in: Tensor | None = None) -> Tensor:
        return block_in + u.squeeze(-2)

    def out_units(self, u: Tensor, units: Tensor | None = None) -> Tensor:
        return _select(u, units)


def _select(u: Tensor, units: Tensor | None) -> Tensor:
    return u if units is None else u.index_select(-2, units.to(u.device))


FAMILIES: dict[str, type] = {"feature": FeatureFamily, "error": ErrorFamily, "neuron": NeuronFamily,
                             "head": HeadFamily, "mlp": MLPFamily, "embed": EmbedFamily, "block": BlockFamily}
#: The family of each sender-group kind of the head / MLP engine (patching/wiring.py).
GROUP_FAMILIES: dict[str, type] = {"embed": EmbedFamily, "pos_embed": EmbedFamily, "heads": HeadFamily,
                                   "mlp": MLPFamily, "neurons": NeuronFamily, "block": BlockFamily}


def group_family(kind: str, hook: str, *, W_O: Tensor | None = None, in_hook: str | None = None) -> Any:
    """The family object of one engine sender group of a built-in kind (its ``units`` / ``from_units`` /
    ``out_units``). The engine's groups get theirs from their unit kind (``patching/kinds.py``,
    ``UnitKind.sender``); this is the fallback for a ``SenderGroup`` made by hand."""
    if kind not in GROUP_FAMILIES:
        raise ValueError(f"unknown sender kind {kind!r}; one of {sorted(GROUP_FAMILIES)}")
    return GROUP_FAMILIES[kind].for_group(kind, hook, W_O=W_O, in_hook=in_hook)

__all__ = ["SenderFamily", "FeatureFamily", "ErrorFamily", "SpliceSite", "NeuronFamily", "HeadFamily",
           "MLPFamily", "EmbedFamily", "BlockFamily", "FAMILIES", "GROUP_FAMILIES", "group_family"]
