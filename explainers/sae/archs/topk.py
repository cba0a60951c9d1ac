"""TopK SAE (Gao et al. 2024, *Scaling and evaluating sparse autoencoders*), with the AuxK loss.

``f = ReLU(TopK_k(pre))``: the ``k`` largest pre-activations kept, the rest zero. Loss ``||x - x_hat||^2 +
alpha ||e - e_hat||^2`` where ``e = x - x_hat`` (no gradient) and ``e_hat = z_aux @ W_dec`` reconstructs it from
the ``k_aux`` largest pre-activations among the *dead* latents (not fired in the last ``dead_tokens`` tokens);
``alpha = 1/32``, ``k_aux = d_in / 2`` (capped at the number of dead latents), as in the paper. Decoder rows unit
norm (the gradient's component along each row is projected out before the step, rows renormalised after it);
``W_enc = W_dec^T`` at initialisation.
"""

from __future__ import annotations

import torch

from explainers.sae.archs.base import StepContext, TrainArch, register_arch


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def auxk_loss(sae, x, x_hat, pre, ctx: StepContext) -> torch.Tensor:
    """``||e - e_hat||^2`` (summed over d, mean over the batch) from the top-``k_aux`` dead latents; 0 if none."""
    n_dead = int(ctx.dead.sum())
    if n_dead == 0 or ctx.cfg.aux_k_coefficient == 0:
        return pre.new_zeros(())
    k_aux = min(ctx.cfg.aux_k or x.shape[-1] // 2, n_dead)
    dead_pre = pre.masked_fill(~ctx.dead, float("-inf"))
    vals, idx = torch.topk(dead_pre, k_aux, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    e = (x - x_hat).detach()
    return ctx.cfg.aux_k_coefficient * ((e - z @ sae.W_dec) ** 2).sum(-1).mean()


@register_arch
class TopK(TrainArch):
    name = "topk"
    saelens_architecture = "topk"

    def forward(self, sae, x, ctx: StepContext):
        pre = sae.pre_acts(x)
        return topk_relu(pre, ctx.cfg.k), pre

    def losses(self, sae, x, x_hat, f, pre, ctx: StepContext):
        return {"auxk": auxk_loss(sae, x, x_hat, pre, ctx)}
