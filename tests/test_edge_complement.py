"""The edge patcher's complement form (``R_r - sum over kept edges``) against its direct form and the oracle.

Oracles: the direct form (``complement=False``: the sum over ablated edges, checked against hand-written hooks
in test_patching_exact.py) on the same masks; the fully ablated and clean runs; a half-precision model, where
the complement must not be used.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, native_bridge, random_batch

from patching import ComponentGraph, EdgePatcher

BATCH = random_batch(B=5, P=8)


def sparse_masks(E: int, seed: int = 0) -> torch.Tensor:
    """Ablation masks from nearly everything ablated (circuits of a few edges) to nearly nothing."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.rand(E, generator=g) < p for p in (0.0, 0.02, 0.05, 0.1, 0.3, 0.6, 0.95)])
    return ~keep


class Spy:
    """Counts the receiver groups that ran in the complement form."""

    def __init__(self, patcher: EdgePatcher):
        self.n = 0
        orig = patcher._set_chunk

        def set_chunk(mask, stage):
            orig(mask, stage)
            self.n += sum(int(k.sum()) for k in patcher._st.edge.comp if k is not None)
        patcher._set_chunk = set_chunk


MODELS = {
    "gpt2": lambda: gpt2_bridge(),
    "llama-gqa": lambda: llama_bridge(n_heads=4, n_kv_heads=2),
    "native": lambda: native_bridge(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_complement_equals_direct(name, ablation):
    model = MODELS[name]()
    graph = ComponentGraph.from_model(model)
    masks = sparse_masks(graph.n_edges)
    opts = dict(ablation=ablation, metric="logit_diff", prompt_batch=3, chunk_size=1)
    fast = EdgePatcher(model, graph, BATCH, **opts)
    slow = EdgePatcher(model, graph, BATCH, complement=False, **opts)
    assert all(fast._comp_ok), "the residual-sum identity failed its setup check on a plain transformer"
    spy = Spy(fast)
    got, want = fast.run_logits(masks), slow.run_logits(masks)
    assert spy.n > 0, "no receiver group took the complement form on sparse circuits"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # the all-ablated and clean ends
    torch.testing.assert_close(fast.ablated_metric, slow.ablated_metric, atol=1e-5, rtol=1e-5)
    none = fast.run(torch.zeros(1, graph.n_edges, dtype=torch.bool))[0]
    torch.testing.assert_close(none, fast.clean_metric)


@pytest.mark.parametrize("qkv_path", ["split", "projected"])
def test_complement_each_qkv_path(qkv_path):
    model = llama_bridge(n_heads=4, n_kv_heads=2)
    graph = ComponentGraph.from_model(model)
    if qkv_path not in graph.meta.get("qkv_paths", [qkv_path]):
        pytest.fail(f"{qkv_path} should be available on a llama bridge")
    masks = sparse_masks(graph.n_edges, seed=1)
    fast = EdgePatcher(model, graph, BATCH, qkv_path=qkv_path, chunk_size=1)
    slow = EdgePatcher(model, graph, BATCH, qkv_path=qkv_path, chunk_size=1, complement=False)
    spy = Spy(fast)
    torch.testing.assert_close(fast.run(masks), slow.run(masks), atol=2e-5, rtol=1e-5)
    assert spy.n > 0


def test_complement_per_chunk_of_single_edge_removals():
    """Greedy's masks: one circuit minus each of its edges, many masks per forward."""
    model = gpt2_bridge()
    graph = ComponentGraph.from_model(model)
    g = torch.Generator().manual_seed(3)
    kept = torch.rand(graph.n_edges, generator=g) < 0.08
    edges = kept.nonzero()[:, 0]
    cands = kept.repeat(len(edges), 1)
    cands[torch.arange(len(edges)), edges] = False
    fast = EdgePatcher(model, graph, BATCH, chunk_size=4)
    slow = EdgePatcher(model, graph, BATCH, chunk_size=4, complement=False)
    spy = Spy(fast)
    torch.testing.assert_close(fast.run(~cands), slow.run(~cands), atol=2e-5, rtol=1e-5)
    assert spy.n > 0


def test_half_precision_keeps_the_direct_form():
    model = gpt2_bridge().to(torch.bfloat16)
    graph = ComponentGraph.from_model(model)
    p = EdgePatcher(model, graph, BATCH)
    assert not any(p._comp_ok) and all(not part.cache for part in p.parts)
    spy = Spy(p)
    p.run(sparse_masks(graph.n_edges)[:2])
    assert spy.n == 0
