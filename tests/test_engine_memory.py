"""The memory budget of a batched forward (patching/memory.py): measured, not assumed.

The peak resident memory of ``run()`` is measured in a fresh process (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``; glibc told to return every block over 64 KiB to the system at once, so the resident
size follows the live tensors) and must stay within ``max_bytes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, random_batch

from patching import ComponentGraph, EdgePatcher, edge_patching_scores

TESTS = Path(__file__).resolve().parent
PROBE = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from helpers_models import gpt2_bridge, llama_bridge, random_batch
from patching import ComponentGraph, EdgePatcher, NodePatcher
from patching.memory import peak_rss_bytes, reset_peak_rss
kind, level, qkv, budget = {kind!r}, {level!r}, {qkv!r}, {budget}
m = (llama_bridge if kind == "llama" else gpt2_bridge)(n_layers=4, d_model=128, n_heads=8, n_ctx=32, seed=0)
g = ComponentGraph.from_model(m)
batch = random_batch(B=12, P=24, seed=1)
if level == "edge":
    p = EdgePatcher(m, g, batch, max_bytes=budget, qkv_path=qkv)
    masks = torch.rand(12, g.n_edges, generator=torch.Generator().manual_seed(0)) < 0.5
else:
    p = NodePatcher(m, g, batch, max_bytes=budget)
    masks = (torch.rand(12, g.n_nodes, generator=torch.Generator().manual_seed(0)) < 0.5) & p.ablatable
p.run(masks[:2])
ok = reset_peak_rss()
r0 = peak_rss_bytes()
p.run(masks)
print(json.dumps({{"ok": ok, "peak": peak_rss_bytes() - r0, "prompt_batch": p.prompt_batch}}))
"""


def measured_peak(kind: str, level: str, qkv: str | None, budget: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    code = PROBE.format(tests=str(TESTS), kind=kind, level=level, qkv=qkv, budget=budget)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.parametrize("kind,level,qkv,mib", [("llama", "edge", "projected", 4), ("gpt2", "edge", "split", 12),
                                                ("llama", "node", None, 2)])
def test_measured_peak_memory_stays_within_the_budget(kind, level, qkv, mib):
    budget = mib << 20
    r = measured_peak(kind, level, qkv, budget)
    assert r["ok"]
    assert r["prompt_batch"] < 12 or level == "node"  # the budget, not the task, sets the prompt batch
    assert r["peak"] <= budget, (r, budget)  # measured: 0.54-0.93 of the budget over 12 configurations


def test_one_mask_over_the_budget_is_a_one_line_error():
    m = llama_bridge(n_layers=3, d_model=64)
    g = ComponentGraph.from_model(m)
    batch = random_batch(B=16, P=12)
    # an explicit prompt batch is taken as given: the patcher's own all-edges run is then one mask over the budget
    with pytest.raises(ValueError, match=r"over the memory budget max_bytes=2 MiB; use a smaller prompt_batch") as e:
        EdgePatcher(m, g, batch, prompt_batch=16, max_bytes=2 << 20)
    assert "\n" not in str(e.value)
    p = EdgePatcher(m, g, batch, max_bytes=2 << 20)  # None: sized to the budget
    assert p.prompt_batch < 16 and len(p.parts) > 1
    with pytest.raises(ValueError, match="single prompt"):
        EdgePatcher(m, g, batch, max_bytes=4096)


def test_prompt_batch_follows_the_budget():
    m = gpt2_bridge(n_layers=2)
    g = ComponentGraph.from_model(m)
    batch = random_batch(B=12, P=10)
    sizes = [EdgePatcher(m, g, batch, max_bytes=kib << 10).prompt_batch for kib in (200, 500, 4096)]
    assert sizes[0] < sizes[1] < sizes[2] == 12
    p = EdgePatcher(m, g, batch, max_bytes=500 << 10)
    assert p.memory.worst_mask(p.prompt_batch, 10) <= 500 << 10 < p.memory.worst_mask(p.prompt_batch + 1, 10)


def test_sender_differences_are_held_sparsely():
    """A single edge's sender is upstream of its receiver: a chunk of single-edge masks holds no per-mask
    difference at all, only the distinct senders' clean differences, once; a chunk of dense masks holds per-mask
    differences for the re-run senders it uses and shares the upstream ones."""
    m = llama_bridge(n_layers=3, d_model=64, n_heads=4)
    g = ComponentGraph.from_model(m)
    batch = random_batch(B=8, P=12)
    p = EdgePatcher(m, g, batch, prompt_batch=8, complement=False)  # the direct form (complement: below)
    part = p.parts[0]
    p._use(part)
    cols = torch.tensor(g.incoming("a2.h1", "k"))
    single = torch.zeros(len(cols), g.n_edges, dtype=torch.bool)
    single[torch.arange(len(cols)), cols] = True
    assert set(part.runner.start(single).tolist()) == {4}  # layer 2's attention: stage 2 * 2
    p._st.K = len(cols)
    p._set_chunk(single, 4)
    c, dev = p._st.edge, p.wiring.device
    assert c.D[dev].shape[:2] == (len(cols), 0) and c.Dc[dev].shape[0] == len(cols)  # 11 senders, each once
    p._reset()
    dense = torch.ones(3, g.n_edges, dtype=torch.bool)
    p._st.K = 3
    p._set_chunk(dense, 0)
    c = p._st.edge
    assert c.D[dev].shape[:2] == (3, len(g.senders) - 1) and c.Dc[dev].shape[0] == 1  # embed: never re-run
    p._reset()
    # the complement form: masks that keep nothing read no sender difference at all (R_r only)
    pc = EdgePatcher(m, g, batch, prompt_batch=8)
    pc._use(pc.parts[0])
    pc._st.K = 3
    pc._set_chunk(dense, 0)
    c = pc._st.edge
    assert all((c.comp[r.i] is not None and bool(c.comp[r.i].all())) == (r.prefix > 1)  # one sender: no gain
               for r in pc.wiring.receivers)
    assert c.D[dev].shape[:2] == (3, 0) and c.Dc[dev].shape[0] == 1  # only the embedding, for layer 0
    pc._reset()
    budget = 3 << 20
    q = EdgePatcher(m, g, batch, max_bytes=budget, prompt_batch=8)
    q._use(q.parts[0])
    assert max(len(x) for x in q._plan(single, 4)) > max(len(x) for x in q._plan(dense.repeat(4, 1), 0))
    # and the numbers are the ones of one mask at a time
    exact = edge_patching_scores(m, g, batch, max_bytes=budget, prompt_batch=8)
    one = EdgePatcher(m, g, batch, chunk_size=1)
    want = (one.run(single) - one.clean_metric).mean(-1)
    assert torch.allclose(exact.values[cols], want, atol=1e-5)
