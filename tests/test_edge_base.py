"""Edge runs relative to a base mask (``EdgePatcher.based_on``) against plain runs of the same masks.

Oracle: the plain run (every mask from the clean run, itself checked against hand-written hooks in
test_patching_exact.py). A based run must give the same numbers while starting each mask at the first receiver
stage where it differs from the base.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, native_bridge, random_batch

from patching import ComponentGraph, EdgePatcher

BATCH = random_batch(B=5, P=8)
MODELS = {
    "gpt2": lambda: gpt2_bridge(n_layers=3),
    "llama-gqa": lambda: llama_bridge(n_layers=3, n_heads=4, n_kv_heads=2),
    "native": lambda: native_bridge(),
}


def circuit_and_candidates(E: int, seed: int = 0):
    """A sparse circuit (ablate mask) and greedy-style candidates: the circuit minus each of some kept edges,
    plus masks that differ from it in several places and the base itself."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(E, generator=g) < 0.15
    edges = kept.nonzero()[:, 0]
    cands = kept.repeat(len(edges), 1)
    cands[torch.arange(len(edges)), edges] = False
    multi = kept.repeat(3, 1)
    multi[0, edges[:3]] = False
    multi[1, edges[-2:]] = False
    multi[2] = torch.rand(E, generator=g) < 0.5
    return ~kept, ~torch.cat([cands, multi, kept[None]])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("complement", [True, False])
def test_based_runs_equal_plain_runs(name, complement):
    model = MODELS[name]()
    graph = ComponentGraph.from_model(model)
    base, masks = circuit_and_candidates(graph.n_edges)
    p = EdgePatcher(model, graph, BATCH, prompt_batch=3, complement=complement)
    want = p.run_logits(masks)
    before = p.forward_passes
    with p.based_on(base):
        got = p.run_logits(masks)
        assert torch.equal(got[-1], p.run_logits(base[None])[0])  # the base itself: its recorded logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert p.forward_passes > before
    assert all("base" not in part.cache for part in p.parts)  # restored on exit
    torch.testing.assert_close(p.run_logits(masks[:4]), want[:4])


def test_based_runs_start_late():
    """A mask that differs from the base only at the logits re-runs nothing but the unembedding."""
    model = gpt2_bridge(n_layers=3)
    graph = ComponentGraph.from_model(model)
    base, _ = circuit_and_candidates(graph.n_edges, seed=2)
    late = [i for i, e in enumerate(graph.edges) if e.receiver == "logits" and not base[i]]
    mask = base.clone()
    mask[late[0]] = True
    p = EdgePatcher(model, graph, BATCH)
    runner = p.parts[0].runner
    assert runner is not None
    assert int(runner.start(mask[None])[0]) < runner.none - 1       # plain: from the first ablated edge
    with p.based_on(base):
        assert int(runner.start(mask[None])[0]) == runner.none - 1  # based: the logits stage only
        got = p.run(mask[None])
    torch.testing.assert_close(got, p.run(mask[None]), atol=2e-5, rtol=1e-5)


def test_base_is_released_when_the_body_raises():
    model = gpt2_bridge(n_layers=2)
    graph = ComponentGraph.from_model(model)
    base, masks = circuit_and_candidates(graph.n_edges, seed=4)
    p = EdgePatcher(model, graph, BATCH)
    with pytest.raises(RuntimeError), p.based_on(base):
        raise RuntimeError("boom")
    assert p.parts[0].runner.base is None and "base" not in p.parts[0].cache
