"""A sparse autoencoder over activations at one hook, in inference form.

``x`` (``[..., d_in]``) is encoded by ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc`` and an
activation that depends on the architecture, and decoded affinely by ``x_hat = f @ W_dec + b_dec``:

========== ============================================== =====================================================
arch       activation (inference)                         paper
========== ============================================== =====================================================
relu-l1    ``ReLU(pre)``                                  Bricken et al. 2023; Anthropic, April 2024 update
topk       ``ReLU`` of the ``k`` largest ``pre``, 0 else  Gao et al. 2024, *Scaling and evaluating SAEs*
batchtopk  JumpReLU with one threshold for all latents    Bussmann et al. 2024, *BatchTopK SAEs*
jumprelu   ``pre * H(pre - theta_i)`` (``theta_i > 0``)   Rajamanoharan et al. 2024, *Jumping Ahead*
========== ============================================== =====================================================

(TopK keeps at most ``k`` latents: exactly ``k`` unless fewer than ``k`` pre-activations are positive.)
Centring (the project's three options, recorded in :attr:`SAEConfig.centring`):

- ``none``: no pre-encoder bias and no decoder bias (``b_dec = 0``, not trained): a truly zero-centred SAE;
- ``learned``: ``b_dec`` is subtracted before encoding and added after decoding, trained, initialised at the
  geometric median of the data (common practice; SAELens' ``apply_b_dec_to_input``);
- ``mean``: ``b_dec`` is fixed to the data mean: the input is centred on it before encoding and it is restored
  after decoding. In SAELens' terms this is an SAE with ``b_dec = mean`` and ``apply_b_dec_to_input = True``,
  so SAELens encodes it identically; only training differs (``b_dec`` is not a parameter).

Training (losses, straight-through estimators, dead-latent handling) lives in :mod:`explainers.sae.archs`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

ARCHS = ("relu-l1", "topk", "batchtopk", "jumprelu")
CENTRINGS = ("none", "learned", "mean")


@dataclass(frozen=True)
class SAEConfig:
    """What is needed to run an SAE (training settings are in ``TrainConfig``)."""

    d_in: int
    d_sae: int
    arch: str
    centring: str
    k: int | None = None                 # topk
    hook: str = ""
    model: str = ""
    apply_b_dec_to_input: bool = True    # False for centring "none" (and foreign SAEs that say so)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"SAE architecture {self.arch!r} unknown; one of {ARCHS}")
        if self.centring not in CENTRINGS:
            raise ValueError(f"SAE centring {self.centring!r} unknown; one of {CENTRINGS}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"SAE sizes must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.arch == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ValueError(f"topk SAE needs 1 <= k <= d_sae ({self.d_sae}), got k={self.k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"SAEConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class SAE(nn.Module):
    """Parameters ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
    jumprelu / batchtopk, ``threshold [d_sae]`` (SAELens names and shapes)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d), requires_grad=cfg.centring == "learned")
        if cfg.arch in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(torch.zeros(n), requires_grad=False)

    # -- inference ---------------------------------------------------------------------------------------------
    def pre_acts(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... n"]) -> Float[Tensor, "... n"]:
        """The inference activation of this architecture (module docstring)."""
        arch = self.cfg.arch
        if arch == "relu-l1":
            return torch.relu(pre)
        if arch == "topk":
            vals, idx = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return self.activate(self.pre_acts(x))

    def decode(self, f: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d"]) -> tuple[Float[Tensor, "... d"], Float[Tensor, "... n"]]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        """Turn an SAE trained on ``x * s`` into one on raw ``x`` (pre-activations and thresholds unchanged)."""
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors saved in ``sae_weights.safetensors`` (detached, contiguous, on CPU)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
