"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, *BatchTopK Sparse Autoencoders*).

Training: ``ReLU(pre)`` over the whole batch of ``B`` rows, keeping the ``k * B`` largest values (so ``k`` latents
per row on average, more on some rows, fewer on others), with Gao et al.'s AuxK loss for dead latents and unit-norm
decoder rows as for TopK. Inference: a JumpReLU with one global threshold ``theta`` for every latent, estimated as
in the paper: the mean over ``threshold_batches`` training batches of the smallest positive activation that the
batch top-k keeps. Saved as a SAELens ``jumprelu`` SAE with ``threshold = theta`` for every latent (as SAELens
itself saves BatchTopK SAEs).
"""

from __future__ import annotations

import torch

from explainers.sae.archs.base import StepContext, TrainArch, register_arch
from explainers.sae.archs.topk import auxk_loss


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    acts = torch.relu(pre)
    flat = acts.flatten()
    n_keep = min(int(k * acts.shape[0]), flat.numel())
    vals, idx = torch.topk(flat, n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(acts.shape)


@register_arch
class BatchTopK(TrainArch):
    name = "batchtopk"
    saelens_architecture = "jumprelu"

    def forward(self, sae, x, ctx: StepContext):
        pre = sae.pre_acts(x)
        return batch_topk(pre, ctx.cfg.k), pre

    def losses(self, sae, x, x_hat, f, pre, ctx: StepContext):
        return {"auxk": auxk_loss(sae, x, x_hat, pre, ctx)}

    @torch.no_grad()
    def finalize(self, sae, batches, cfg):
        mins = []
        for x in batches:
            f = batch_topk(sae.pre_acts(x), cfg.k)
            pos = f[f > 0]
            if pos.numel():
                mins.append(float(pos.min()))
        if not mins:
            raise RuntimeError("batchtopk: no latent fired on the threshold batches; the SAE is dead")
        theta = sum(mins) / len(mins)
        sae.threshold.fill_(theta)
        return {"threshold": theta, "threshold_batches": len(mins)}
