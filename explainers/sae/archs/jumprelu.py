"""JumpReLU SAE (Rajamanoharan et al. 2024, *Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU SAEs*).

``f = pre * H(pre - theta)`` with a learned threshold per latent, ``theta = exp(log_theta)``. Loss
``||x - x_hat||^2 + lambda * ||f||_0`` with ``||f||_0 = sum_i H(pre_i - theta_i)``, ``lambda`` ramped linearly over
``sparsity_warmup``. The step function has no useful gradient, so the paper's straight-through estimators are used,
with the rectangle kernel ``K(u) = 1[|u| < 1/2]`` and bandwidth ``eps``:

- ``d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps)``; ``d JumpReLU / d pre = H(pre - theta)``;
- ``d H(pre - theta) / d theta = -(1 / eps) K((pre - theta) / eps)``; no gradient to ``pre`` through ``H``.

Defaults (at the input scale ``E||x|| = sqrt(d_in)`` used here, as SAELens): ``theta`` initialised at 0.01,
``eps = 0.05``. Decoder rows unit norm, ``W_enc = W_dec^T``, ``b_enc = 0`` at initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from explainers.sae.archs.base import StepContext, TrainArch, register_arch


def _kernel(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = (pre > theta).to(g.dtype) * g
        g_theta = (-(theta / eps) * _kernel((pre - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return g_pre, g_theta, None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (-(1.0 / eps) * _kernel((pre - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return None, g_theta, None


@register_arch
class JumpReLU(TrainArch):
    name = "jumprelu"
    saelens_architecture = "jumprelu"

    def setup(self, sae, cfg):
        sae.log_threshold = nn.Parameter(torch.full((sae.cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    def forward(self, sae, x, ctx: StepContext):
        pre = sae.pre_acts(x)
        theta = sae.log_threshold.exp()
        return JumpReLUFn.apply(pre, theta, ctx.cfg.jumprelu_bandwidth), pre

    def losses(self, sae, x, x_hat, f, pre, ctx: StepContext):
        lam = ctx.cfg.l0_coefficient * ctx.warmup(ctx.cfg.sparsity_warmup)
        theta = sae.log_threshold.exp()
        l0 = StepFn.apply(pre, theta, ctx.cfg.jumprelu_bandwidth).sum(-1).mean()
        return {"l0": lam * l0}

    @torch.no_grad()
    def finalize(self, sae, batches, cfg):
        sae.threshold.copy_(sae.log_threshold.exp())
        del sae.log_threshold
        return {"threshold_mean": float(sae.threshold.mean())}
