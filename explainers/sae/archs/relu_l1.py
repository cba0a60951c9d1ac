"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, *Circuits Updates, April 2024*:
"Training Sparse Autoencoders").

``f = ReLU(pre)``; loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec[i]||_2`` with ``lambda`` ramped linearly
from 0 over the first ``sparsity_warmup`` of training (5 % there). The decoder norms are free (no unit-norm
constraint: the penalty is what keeps them from shrinking ``f``); decoder rows start as random directions of norm
0.1 and ``W_enc = W_dec^T``, ``b_enc = 0``. Inputs scaled to ``E||x|| = sqrt(d_in)``, gradient norm clipped at 1.
"""

from __future__ import annotations

import torch

from explainers.sae.archs.base import StepContext, TrainArch, register_arch


@register_arch
class ReluL1(TrainArch):
    name = "relu-l1"
    saelens_architecture = "standard"
    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def forward(self, sae, x, ctx: StepContext):
        pre = sae.pre_acts(x)
        return torch.relu(pre), pre

    def losses(self, sae, x, x_hat, f, pre, ctx: StepContext):
        lam = ctx.cfg.l1_coefficient * ctx.warmup(ctx.cfg.sparsity_warmup)
        return {"l1": lam * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()}
