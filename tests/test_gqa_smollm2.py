"""Edge-level patching on the real grouped-query model smollm2-135m (30 layers, 9 query / 3 k/v heads): the graph,
the ungrouped forward, hand-written hooks on the grouped model for single edges, and prompt batches."""

from __future__ import annotations

import torch
from test_gqa import hand_gqa_logits

from patching import ComponentGraph, EdgePatcher, eap
from patching.gqa import kv_groups, ungrouped
from patching.metrics import gather_pos
from patching.wiring import prepared


def expected_edges(n_layers: int, n_heads: int) -> int:
    """Hand count (embed only, an MLP in every layer): attention receivers read everything in earlier layers
    (x3 for q, k, v), an MLP also reads its own layer's heads, logits read every sender."""
    total, senders = 0, 1
    for _ in range(n_layers):
        total += 3 * n_heads * senders
        senders += n_heads
        total += senders
        senders += 1
    return total + senders


def ioi_batch(model, n: int):
    from circuits.models import load_tokenizer
    from circuits.tasks import get_task

    tok = load_tokenizer("smollm2-135m")
    return get_task("ioi", n=n, seed=3, tokenizer=tok).batch(tok)


def test_smollm2_graph_has_edges_per_query_head(smollm2):
    g = ComponentGraph.from_model(smollm2)
    assert g.supports_edges and g.meta["n_kv_heads"] == 3 and kv_groups(smollm2) == 3
    assert g.n_edges == expected_edges(30, 9) == 123211
    assert g.meta["qkv_paths"] == ["projected", "split"] and g.meta["logits_at_pos"]
    batch = ioi_batch(smollm2, 2)
    with torch.no_grad(), prepared(smollm2):
        want = smollm2(batch.clean)
        with ungrouped(smollm2):
            got = smollm2(batch.clean)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_smollm2_single_edges_match_hand_written_hooks(smollm2):
    g = ComponentGraph.from_model(smollm2)
    batch = ioi_batch(smollm2, 2)
    # keys and values of heads that share a k/v head (a12.h3, h4, h5 read k/v head 1), a query, an MLP, the logits
    sets = [["a9.h1->a12.h4<k>"], ["m3->a12.h5<v>"], ["a10.h7->a12.h3<q>"], ["a9.h1->a12.h4<k>", "a9.h1->a12.h5<k>"],
            ["a20.h2->m27"], ["m28->logits"]]
    p = EdgePatcher(smollm2, g, batch, prompt_batch=1)
    got = p.run_logits(torch.stack([g.edge_mask(s) for s in sets]))
    with torch.no_grad(), prepared(smollm2):
        clean = gather_pos(smollm2(batch.clean), batch.pos)
    for k, edges in enumerate(sets):
        want = hand_gqa_logits(smollm2, g, batch, edges)
        err = float((got[k] - want).abs().max())
        assert err <= 2e-4 * float(want.abs().max()), (edges, err)
        assert float((want - clean).abs().max()) > 1e-3, f"{edges} has no effect: weak oracle"


def test_smollm2_eap_is_the_same_in_prompt_batches(smollm2):
    g = ComponentGraph.from_model(smollm2)
    batch = ioi_batch(smollm2, 3)
    a, b = eap(smollm2, g, batch), eap(smollm2, g, batch, prompt_batch=2)
    assert a.values.shape == (123211,) and torch.isfinite(a.values).all()
    assert float((a.values - b.values).abs().max()) <= 1e-4 * float(a.values.abs().max())
