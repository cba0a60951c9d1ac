"""Bases and model linearisations for the feature-circuit tests (tests/test_feature_*.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class SimpleBasis:
    """An affine basis: ``encode(x) = act((x - b_dec) @ W_enc + b_enc)``, ``decode(u) = u @ W_dec + b_dec``.

    ``act``: ``"relu"`` (a ReLU SAE) or ``"none"`` (linear: the SAE encoder without its activation)."""

    def __init__(self, hook: str, W_enc: Tensor, W_dec: Tensor, b_enc: Tensor, b_dec: Tensor, act: str = "relu",
                 name: str = "simple"):
        self.hook, self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.act = hook, W_enc, W_dec, b_enc, b_dec, act
        self.name = name

    @property
    def n_units(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    def encode(self, x: Tensor) -> Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return torch.relu(pre) if self.act == "relu" else pre

    def decode(self, u: Tensor) -> Tensor:
        return u @ self.W_dec + self.b_dec

    @property
    def directions(self) -> Tensor:
        return self.W_dec

    @property
    def bias(self) -> Tensor:
        return self.b_dec


def random_basis(hook: str, d: int, n: int, *, seed: int = 0, act: str = "relu", name: str = "rand") -> SimpleBasis:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d, generator=g) / d ** 0.5
    return SimpleBasis(hook, W_dec.T.clone() * 2, W_dec, 0.1 * torch.randn(n, generator=g) - 0.05,
                       0.1 * torch.randn(d, generator=g), act=act, name=name)


def identity_basis(hook: str, d: int, name: str = "eye") -> SimpleBasis:
    eye = torch.eye(d)
    z = torch.zeros(d)
    return SimpleBasis(hook, eye, eye.clone(), z, z.clone(), act="none", name=name)


def freeze_hooks(model: Any, tokens: Tensor) -> list[tuple[str, Any]]:
    """Hooks that make a (norm-free, ReLU-MLP) bridge linear in its residual stream around the run on
    ``tokens``: attention patterns fixed to that run's, MLP ReLU gates fixed to that run's (``post = pre *
    1[pre_clean > 0]``). Rows of a larger batch repeat the ``tokens`` rows (mask-major), positions are cut."""
    names = [h for h in model.hook_dict if h.endswith("attn.hook_pattern") or h.endswith("mlp.hook_pre")]
    seen: dict[str, Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, lambda x, hook, _h=h: seen.__setitem__(_h, x.detach().clone()))
                                                 for h in names]):
        model(tokens)
    B = tokens.shape[0]

    def tile(t: Tensor, x: Tensor) -> Tensor:
        P = x.shape[-2] if t.dim() == 4 else x.shape[1]
        t = t[:, :, :P, :P] if t.dim() == 4 else t[:, :P]
        return t.repeat(x.shape[0] // B, *([1] * (t.dim() - 1)))

    out: list[tuple[str, Any]] = []
    for h in names:
        if h.endswith("hook_pattern"):
            out.append((h, lambda x, hook, _h=h: tile(seen[_h], x).to(x.dtype)))
            continue
        box: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any, _box: dict = box) -> None:
            _box["pre"] = x

        def gate(x: Tensor, hook: Any, _h: str = h, _box: dict = box) -> Tensor:
            return _box["pre"] * (tile(seen[_h], x) > 0).to(x.dtype)

        out += [(h, keep), (h.replace("hook_pre", "hook_post"), gate)]
    return out
