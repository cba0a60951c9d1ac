"""bfloat16 and float16 models: every engine path runs (the fast suffix path included), metrics and score sums come
back in float32, and the numbers agree with the float32 model to the half-precision rounding."""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, random_batch
from scipy.stats import spearmanr

from patching import ComponentGraph, EdgePatcher, NodePatcher, atp, eap, eap_ig

BATCH = random_batch(B=5, P=8, seed=2)
TOL = {torch.bfloat16: 0.03, torch.float16: 0.005}  # relative to the largest value; measured 0.015 / 0.0012


@pytest.mark.parametrize("build", [llama_bridge, gpt2_bridge])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_engine_matches_float32(build, dtype):
    ref_model, model = build(n_layers=3, seed=1), build(n_layers=3, seed=1).to(dtype)
    g32, g = ComponentGraph.from_model(ref_model), ComponentGraph.from_model(model)
    assert g.supports_edges and g.meta["qkv_paths"] == g32.meta["qkv_paths"]
    masks = torch.rand(6, g.n_edges, generator=torch.Generator().manual_seed(0)) < 0.2

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.dtype == torch.float32 and float((a - b).abs().max()) <= TOL[dtype] * float(b.abs().max())

    p, p32 = EdgePatcher(model, g, BATCH), EdgePatcher(ref_model, g32, BATCH)
    assert p.parts[0].runner is not None and p._replay.usable_from(0)  # the fast path survives half precision
    assert close(p.run(masks), p32.run(masks))
    n, n32 = NodePatcher(model, g, BATCH), NodePatcher(ref_model, g32, BATCH)
    nm = (torch.rand(6, g.n_nodes, generator=torch.Generator().manual_seed(1)) < 0.3) & n.ablatable
    assert n._replay.usable_from(0) and close(n.run(nm), n32.run(nm))
    kl = EdgePatcher(model, g, BATCH, metric="kl")
    assert kl.clean_metric.dtype == torch.float32 and float(kl.clean_metric.abs().max()) == 0.0
    for fn in (eap, lambda *a, **k: eap_ig(*a, steps=3, **k), atp):
        s, s32 = fn(model, g, BATCH), fn(ref_model, g32, BATCH)
        assert close(s.values, s32.values), float((s.values - s32.values).abs().max())
        assert spearmanr(s.values, s32.values)[0] > 0.98
