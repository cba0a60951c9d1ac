"""Prompt batches (patching/parts.py) change how much the engine holds at once, never a number: every engine call
with ``prompt_batch`` equals the same call on the whole batch, for each ablation, metric, q/k/v path and method."""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, random_batch
from test_gqa import gqa_pair

from patching import (
    ComponentGraph,
    EdgePatcher,
    NodePatcher,
    atp,
    eap,
    eap_ig,
    edge_patching_scores,
    node_patching_scores,
)

BATCH = random_batch(B=7, P=9, seed=6)  # ragged: prompt batches are trimmed to their longest prompt


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bridge(n_layers=3, seed=7)


@pytest.fixture(scope="module")
def llama():
    return llama_bridge(n_layers=3, seed=8)


def masks_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(n, dtype=torch.bool)[torch.randperm(n, generator=g)[:25]],
                      torch.rand(6, n, generator=g) < 0.3, torch.rand(6, n, generator=g) < 0.02,
                      torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)])


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_edge_and_node_patchers_equal_across_prompt_batches(gpt2, ablation, metric):
    g = ComponentGraph.from_model(gpt2, neurons=True)
    whole = EdgePatcher(gpt2, g, BATCH, ablation=ablation, metric=metric)
    parts = EdgePatcher(gpt2, g, BATCH, ablation=ablation, metric=metric, prompt_batch=3)
    assert len(whole.parts) == 1 and [p.B for p in parts.parts] == [3, 3, 1]
    assert [p.P for p in parts.parts] != [BATCH.clean.shape[1]] * 3  # trimmed to each batch's longest prompt
    em = masks_for(g.n_edges)
    a, b = whole.run(em), parts.run(em)
    assert a.shape == b.shape == (len(em), len(BATCH))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(whole.ablated_metric, parts.ablated_metric, atol=1e-5)
    assert torch.allclose(whole.clean_metric, parts.clean_metric, atol=1e-5)
    nw = NodePatcher(gpt2, g, BATCH, ablation=ablation, metric=metric)
    npb = NodePatcher(gpt2, g, BATCH, ablation=ablation, metric=metric, prompt_batch=2)
    nm = masks_for(g.n_nodes, seed=1) & nw.ablatable
    assert torch.allclose(nw.run(nm), npb.run(nm), atol=1e-5)


@pytest.mark.parametrize("qkv", ["projected", "split"])
def test_edge_patcher_prompt_batches_on_llama_and_gqa(llama, qkv):
    gq, _ = gqa_pair(seed=9)
    for m in (llama, gq):
        g = ComponentGraph.from_model(m)
        em = masks_for(g.n_edges, seed=2)
        a = EdgePatcher(m, g, BATCH, qkv_path=qkv).run(em)
        b = EdgePatcher(m, g, BATCH, qkv_path=qkv, prompt_batch=2, chunk_size=5).run(em)
        assert torch.allclose(a, b, atol=1e-5)


def test_mean_ablation_is_over_every_prompt_not_per_batch(gpt2):
    """A prompt batch's own mean would differ: the patcher averages over all prompts of the task first."""
    g = ComponentGraph.from_model(gpt2)
    whole = EdgePatcher(gpt2, g, BATCH, ablation="mean")
    parts = EdgePatcher(gpt2, g, BATCH, ablation="mean", prompt_batch=3)
    for k in whole.abl_units:
        for part in parts.parts:
            assert torch.allclose(part.abl_units[k], whole.abl_units[k], atol=1e-6)
    alone = EdgePatcher(gpt2, g, BATCH[:3], ablation="mean")
    assert not torch.allclose(alone.abl_units["embed"], whole.abl_units["embed"], atol=1e-4)


def test_score_functions_and_attribution_equal_across_prompt_batches(gpt2):
    g = ComponentGraph.from_model(gpt2, neurons=True)
    for fn in (edge_patching_scores, node_patching_scores, eap, atp,
               lambda *a, **k: eap_ig(*a, steps=3, **k), lambda *a, **k: atp(*a, level="neuron", **k)):
        for ablation in ("resample", "mean"):
            a = fn(gpt2, g, BATCH, ablation=ablation)
            b = fn(gpt2, g, BATCH, ablation=ablation, prompt_batch=3)
            assert a.ids == b.ids and torch.allclose(a.values, b.values, atol=2e-5), \
                (ablation, float((a.values - b.values).abs().max()))
            assert a.values.abs().max() > 1e-2


def test_attribution_counts_forwards_per_prompt_batch(gpt2):
    g = ComponentGraph.from_model(gpt2)
    assert eap(gpt2, g, BATCH).forward_passes == 2                            # clean+grad, corrupted
    assert eap(gpt2, g, BATCH, prompt_batch=3).forward_passes == 2 * 3
    assert eap_ig(gpt2, g, BATCH, steps=4, prompt_batch=4).forward_passes == 2 * (4 + 1)  # 4 points, corrupted
    # mean over several prompt batches: one clean pass per batch to take the mean first
    assert eap(gpt2, g, BATCH, ablation="mean", prompt_batch=4).forward_passes == 2 + 2


def test_bad_prompt_batch_is_an_error(gpt2):
    g = ComponentGraph.from_model(gpt2)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="prompt_batch"):
            EdgePatcher(gpt2, g, BATCH, prompt_batch=bad)
        with pytest.raises(ValueError, match="prompt_batch"):
            eap(gpt2, g, BATCH, prompt_batch=bad)


def test_eap_ig_scores_the_same_with_and_without_gradient_sums(gpt2, monkeypatch):
    """EAP-IG keeps per-group gradient sums over its points when they fit ``SUM_BYTES``, and otherwise scores each
    point's gradients as the backward pass produces them (memory bounded by one layer's gradients)."""
    import patching.attribution as attribution

    g = ComponentGraph.from_model(gpt2)
    summed = eap_ig(gpt2, g, BATCH, steps=4)
    monkeypatch.setattr(attribution, "SUM_BYTES", 0)
    streamed = eap_ig(gpt2, g, BATCH, steps=4)
    assert torch.allclose(summed.values, streamed.values, atol=1e-5) and summed.values.abs().max() > 1e-2
