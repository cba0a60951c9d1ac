"""The node engine's fast path (run from the first ablated layer, the last MLP at the prediction position)
against whole forward passes, on every architecture the engine supports, with each of its branches forced."""

from __future__ import annotations

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, mamba_bridge, native_bridge, random_batch

from patching import ComponentGraph, NodePatcher
from patching.replay import Replay
from patching.wiring import prepared

BATCH = random_batch(B=5, P=8)

MODELS = {
    "gpt2-3l": lambda: gpt2_bridge(n_layers=3),
    "llama-gqa-3l": lambda: llama_bridge(n_layers=3, n_kv_heads=2),
    "native-3l": lambda: native_bridge(n_layers=3),
    "mamba": lambda: mamba_bridge(),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def masks_for(p: NodePatcher, seed: int = 0) -> torch.Tensor:
    """Every node alone, random sparse and dense node sets, and the empty mask."""
    n, ok = p.graph.n_nodes, p.ablatable
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(n, dtype=torch.bool)[ok],
                      (torch.rand(12, n, generator=g) < 0.1) & ok,
                      (torch.rand(12, n, generator=g) < 0.4) & ok,
                      torch.zeros(1, n, dtype=torch.bool)])


def assert_same(fast: NodePatcher, slow: NodePatcher, masks: torch.Tensor) -> None:
    a, b = fast.run_logits(masks), slow.run_logits(masks)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), float((a - b).abs().max())
    # the masks really change the output (the comparison is not between two clean runs)
    assert float((b - slow.clean_logits).abs().amax((1, 2)).max()) > 1e-3


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_fast_path_equals_whole_forwards(model, ablation):
    neurons = "b0" not in ComponentGraph.from_model(model).node_index
    g = ComponentGraph.from_model(model, neurons=neurons)
    fast = NodePatcher(model, g, BATCH, ablation=ablation, chunk_size=7)
    slow = NodePatcher(model, g, BATCH, ablation=ablation, suffix=False)
    assert fast._runner is not None and fast._replay.usable_from(0)
    assert_same(fast, slow, masks_for(fast))
    assert torch.allclose(fast.ablated_metric, slow.ablated_metric, atol=1e-4)


def test_replay_flags_by_architecture():
    llama, mamba = llama_bridge(n_layers=3), mamba_bridge()
    for m, staged in ((llama, True), (mamba, False)):
        p = NodePatcher(m, ComponentGraph.from_model(m), BATCH)
        assert p._replay.logits_ok and all(p._replay.block_ok)
        assert all(s == staged for s in p._replay.staged)
        if staged:
            assert all(p._runner.heads_linear.values())


def test_verify_rejects_a_call_that_does_not_reproduce_the_forward():
    m = llama_bridge(n_layers=2)
    rp = Replay(m, len(BATCH))
    with torch.no_grad(), prepared(m), rp.recording():
        from patching.metrics import gather_pos
        clean = gather_pos(m(BATCH.clean), BATCH.pos)
    good = Replay(m, len(BATCH))
    good.calls = dict(rp.calls)
    with torch.no_grad(), prepared(m):
        good.verify(clean, BATCH.pos)
    assert good.staged == [True, True] and good.block_ok == [True, True] and good.logits_ok
    # a wrong recorded MLP-stage input: layer 1 can no longer be staged, whole blocks still can
    rp.calls[(1, "ln2")].args = (rp.calls[(1, "ln2")].args[0] + 1.0,)
    with torch.no_grad(), prepared(m):
        rp.verify(clean, BATCH.pos)
    assert rp.staged == [True, False] and all(rp.block_ok) and rp.logits_ok


@pytest.mark.parametrize("off", ["staged", "linear", "blocks"])
def test_fallback_branches_equal_whole_forwards(off, monkeypatch):
    """Force each fallback (whole block re-run, then whole forwards) and compare with whole forwards."""
    m = llama_bridge(n_layers=3)
    g = ComponentGraph.from_model(m, neurons=True)
    orig = Replay.verify

    def verify(self, *a, **k):
        orig(self, *a, **k)
        if off == "staged":
            self.staged = [False] * self.n_layers
        elif off == "blocks":
            self.block_ok[1] = False  # masks starting at layers 0 and 1 need whole forwards
    monkeypatch.setattr(Replay, "verify", verify)
    fast = NodePatcher(m, g, BATCH, ablation="resample", chunk_size=9)
    if off == "linear":
        fast._runner.heads_linear = {L: False for L in fast._runner.heads_linear}
    slow = NodePatcher(m, g, BATCH, ablation="resample", suffix=False)
    masks = masks_for(fast, seed=1)
    if off == "blocks":
        start = fast._runner.start(masks)
        assert set(start.tolist()) >= {-1, 4, 5}  # stages: layer 2 heads (4) and MLP (5)
    assert_same(fast, slow, masks)


def test_counts_and_clean_masks():
    m = llama_bridge(n_layers=2)
    g = ComponentGraph.from_model(m)
    p = NodePatcher(m, g, BATCH, chunk_size=4)
    before = p.forward_passes
    out = p.run_logits(torch.zeros(3, g.n_nodes, dtype=torch.bool))
    assert torch.equal(out, p.clean_logits.expand(3, -1, -1)) and p.forward_passes == before
    masks = g.node_mask(["a1.h0"]).unsqueeze(0).repeat(6, 1)
    p.run(masks)
    assert p.forward_passes == before + 2 and p.ablations == 9
    with pytest.raises(ValueError, match="logits node cannot be ablated"):
        p.run(g.node_mask(["logits"]).unsqueeze(0))


EDGE_MODELS = {"gpt2-3l": lambda: gpt2_bridge(n_layers=3), "llama-3l": lambda: llama_bridge(n_layers=3),
               "native-3l": lambda: native_bridge(n_layers=3)}


@pytest.mark.parametrize("name,ablation,qkv", [(n, a, None) for n in sorted(EDGE_MODELS) for a in ("resample", "mean")]
                         + [("gpt2-3l", "resample", "split"), ("llama-3l", "zero", "split")])  # boot_native: no split
def test_edge_fast_path_equals_whole_forwards(name, ablation, qkv):
    from patching import EdgePatcher

    m = EDGE_MODELS[name]()
    g = ComponentGraph.from_model(m)
    fast = EdgePatcher(m, g, BATCH, ablation=ablation, qkv_path=qkv, chunk_size=16)
    slow = EdgePatcher(m, g, BATCH, ablation=ablation, qkv_path=qkv, suffix=False)
    E = g.n_edges
    gen = torch.Generator().manual_seed(2)
    masks = torch.cat([torch.eye(E, dtype=torch.bool), torch.rand(10, E, generator=gen) < 0.3,
                       torch.rand(10, E, generator=gen) < 0.03, torch.zeros(1, E, dtype=torch.bool)])
    start = fast._runner.start(masks)
    assert set(start.tolist()) == {*range(2 * 3 + 1), fast._runner.none}  # every stage, from layer 0 to logits
    assert_same(fast, slow, masks)
    assert torch.allclose(fast.ablated_metric, slow.ablated_metric, atol=1e-4)
