"""Mean ablation (patching/ablation.py) against hand-computed means: real tokens only, BOS left out by default."""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, random_batch

from patching import ComponentGraph, EdgePatcher, NodePatcher, eap
from patching.ablation import bos_token_id, mean_weights
from patching.batch import TaskBatch
from patching.metrics import gather_pos

BATCH = random_batch(B=6, P=8, seed=3)  # BOS (id 0) at position 0, right padding (id 1) after pos


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bridge(seed=5)


def hand_mean_logits(model, batch, reference, *, bos: int | None):
    """Every sender replaced by its mean over ``reference``'s real tokens (BOS tokens left out when ``bos``)."""
    names = ["hook_embed", "hook_pos_embed"] + [f"blocks.{L}.{h}" for L in range(model.cfg.n_layers)
                                                for h in ("attn.hook_result", "hook_mlp_out")]
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(reference.clean, names_filter=names)
            P = reference.clean.shape[1]
            keep = torch.arange(P)[None, :] <= reference.pos[:, None]
            if bos is not None:
                keep &= reference.clean != bos
            w = keep.float()
            means = {}
            for n in names:
                a = cache[n].expand(reference.clean.shape[0], *cache[n].shape[1:])
                ww = w.view(*w.shape, *([1] * (a.dim() - 2)))
                means[n] = (a * ww).sum((0, 1)) / ww.sum()
            with model.hooks(fwd_hooks=[(n, lambda x, hook, m=means[n]: m.expand_as(x).clone()) for n in names]):
                return gather_pos(model(batch.clean), batch.pos)
    finally:
        model.set_use_attn_result(False)


def test_mean_leaves_out_bos_and_padding_by_default(gpt2):
    g = ComponentGraph.from_model(gpt2)
    assert bos_token_id(gpt2) == 0 and bool((BATCH.clean[:, 0] == 0).all())
    want = hand_mean_logits(gpt2, BATCH, BATCH, bos=0)
    old = hand_mean_logits(gpt2, BATCH, BATCH, bos=None)
    assert (want - old).abs().max() > 1e-3  # BOS matters: the flag is not a no-op
    for cls, every in ((EdgePatcher, lambda p: torch.ones(1, g.n_edges, dtype=torch.bool)),
                       (NodePatcher, lambda p: p.ablatable.unsqueeze(0))):
        p = cls(gpt2, g, BATCH, ablation="mean")
        assert torch.allclose(p.run_logits(every(p))[0], want, atol=2e-5)
        q = cls(gpt2, g, BATCH, ablation="mean", mean_include_bos=True)
        assert torch.allclose(q.run_logits(every(q))[0], old, atol=2e-5)


def test_mean_over_a_reference_batch_and_in_prompt_batches(gpt2):
    g = ComponentGraph.from_model(gpt2)
    ref = random_batch(B=9, P=10, seed=8)
    want = hand_mean_logits(gpt2, BATCH, ref, bos=0)
    p = EdgePatcher(gpt2, g, BATCH, ablation="mean", reference=ref, prompt_batch=4)
    assert torch.allclose(p.run_logits(torch.ones(1, g.n_edges, dtype=torch.bool))[0], want, atol=2e-5)
    assert p.forward_passes == 2 + 3 + 2 + 2  # 2 clean prompt batches, 3 reference batches, 2 x 2 all-ablated runs


def test_mean_weights_and_per_position_keeps_bos():
    b = TaskBatch(torch.tensor([[0, 5, 6, 1], [0, 7, 8, 9]]), torch.tensor([[0, 5, 6, 1], [0, 7, 8, 9]]),
                  torch.tensor([2, 3]), torch.tensor([3, 2]), torch.tensor([2, 3]))
    assert mean_weights(b, bos=0).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert mean_weights(b, bos=None).tolist() == [[True, True, True, False], [True, True, True, True]]
    # per position: position 0 is BOS in every prompt, and its mean is BOS's own activation
    assert mean_weights(b, bos=0, per_position=True).tolist() == mean_weights(b, bos=None).tolist()


def test_attribution_uses_the_same_mean(gpt2):
    g = ComponentGraph.from_model(gpt2)
    default, old = eap(gpt2, g, BATCH, ablation="mean"), eap(gpt2, g, BATCH, ablation="mean", mean_include_bos=True)
    assert not torch.allclose(default.values, old.values, atol=1e-4)
