"""Exact edge and node patching against oracles: hand-written hooks, the corrupted run, the clean run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_models import gpt2_bridge, llama_bridge, mamba_bridge, native_bridge, random_batch

from patching import ComponentGraph, EdgePatcher, NodePatcher, edge_patching_scores, node_patching_scores
from patching.ablation import valid_positions
from patching.batch import TaskBatch
from patching.metrics import gather_pos, logit_diff
from patching.wiring import prepared

IOI = Path(__file__).resolve().parents[1] / "circuits" / "zoo" / "checkpoints" / "ioi-2l" / "model.safetensors"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bridge()


@pytest.fixture(scope="module")
def llama():
    return llama_bridge()


@pytest.fixture(scope="module")
def native():
    return native_bridge()


@pytest.fixture(scope="module")
def ioi():
    if not IOI.is_file():
        pytest.fail("zoo model ioi-2l not trained yet")
    from circuits.models import load_model, load_tokenizer
    from circuits.tasks import get_task

    model = load_model("ioi-2l", device="cpu")
    return model, get_task("ioi", n=16, seed=1).batch(load_tokenizer("ioi-2l"))


BATCH = random_batch(B=5, P=8)


def plain_logits(model, tokens, pos, *, split=False):
    with torch.no_grad(), prepared(model, split_qkv=split):
        return gather_pos(model(tokens), pos)


# ---- hand-written oracle: the textbook hooks for a set of ablated edges ----------------------

def sender_hooks(model, graph):
    """(hook name, function(activation) -> {sender id: [B, P, d] output}) for every edge sender."""
    out = [("hook_embed", lambda x: {"embed": x})]
    if "pos_embed" in graph.node_index:
        out.append(("hook_pos_embed", lambda x: {"pos_embed": x}))
    for L in range(model.cfg.n_layers):
        out.append((f"blocks.{L}.attn.hook_result",
                    lambda x, L=L: {f"a{L}.h{h}": x[:, :, h] for h in range(x.shape[2])}))
        if f"m{L}" in graph.node_index:
            out.append((f"blocks.{L}.hook_mlp_out", lambda x, L=L: {f"m{L}": x}))
    return out


def hand_edge_logits(model, graph, batch, edges, source_tokens):
    """Logits at pos with ``edges`` resample-ablated, by explicit per-edge hooks (hook_result, hook_*_input,
    ln2.hook_in, ln_final.hook_in): receiver input += sum over its ablated edges of (source - current)."""
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            source: dict[str, torch.Tensor] = {}
            grab = [(h, lambda x, hook, f=f: source.update(f(x))) for h, f in sender_hooks(model, graph)]
            with model.hooks(fwd_hooks=grab):
                model(source_tokens)
            current: dict[str, torch.Tensor] = {}
            hooks = [(h, lambda x, hook, f=f: current.update(f(x))) for h, f in sender_hooks(model, graph)]
            by_hook: dict[str, list] = {}
            for eid in edges:
                e = graph.edges[graph.edge_index[eid]]
                r = graph.node(e.receiver)
                if r.kind == "attn_head":
                    by_hook.setdefault(f"blocks.{r.layer}.attn.hook_{e.input}_input", []).append((e.sender, r.head))
                elif r.kind == "mlp":
                    by_hook.setdefault(f"blocks.{r.layer}.ln2.hook_in", []).append((e.sender, None))
                else:
                    by_hook.setdefault("ln_final.hook_in", []).append((e.sender, None))

            def receiver(items):
                def fn(x, hook):
                    x = x.clone()
                    for s, head in items:
                        d = source[s] - current[s]
                        if head is None:
                            x += d
                        else:
                            x[:, :, head] += d
                    return x
                return fn
            hooks += [(h, receiver(items)) for h, items in by_hook.items()]
            with model.hooks(fwd_hooks=hooks):
                return gather_pos(model(batch.clean), batch.pos)
    finally:
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)


EDGE_SETS = [
    ["a0.h1->a1.h2<k>"], ["a0.h3->a1.h0<q>"], ["embed->a1.h1<v>"], ["a0.h1->m1"], ["m0->logits"],
    ["a1.h2->logits"],
    # chained: a1.h2's *current* output differs from its clean output once its v input is patched
    ["a0.h1->a1.h2<v>", "a1.h2->logits", "m0->a1.h2<v>", "a1.h2->m1"],
]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_edges_match_hand_written_hooks(name, request):
    model = request.getfixturevalue(name)
    g = ComponentGraph.from_model(model)
    p = EdgePatcher(model, g, BATCH, ablation="resample")
    masks = torch.stack([g.edge_mask(s) for s in EDGE_SETS])
    got = p.run_logits(masks)
    for k, edges in enumerate(EDGE_SETS):
        want = hand_edge_logits(model, g, BATCH, edges, BATCH.corrupt)
        assert torch.allclose(got[k], want, atol=2e-5), (edges, (got[k] - want).abs().max())
        assert (want - p.clean_logits).abs().max() > 1e-4, f"{edges} has no effect: weak oracle"


def test_zoo_ioi_edge_matches_hand_written_hook(ioi):
    model, batch = ioi
    g = ComponentGraph.from_model(model)
    p = EdgePatcher(model, g, batch, ablation="resample")
    for edges in (["a0.h1->a1.h2<k>"], ["a1.h0->logits"], ["a0.h2->a1.h3<q>", "a1.h3->logits"]):
        got = p.run_logits(g.edge_mask(edges).unsqueeze(0))[0]
        want = hand_edge_logits(model, g, batch, edges, batch.corrupt)
        assert torch.allclose(got, want, atol=1e-4), (edges, (got - want).abs().max())


@pytest.mark.parametrize("name", ["gpt2", "llama", "native"])
@pytest.mark.parametrize("patcher", ["edge", "node"])
def test_clean_into_clean_is_identity(name, patcher, request):
    model = request.getfixturevalue(name)
    g = ComponentGraph.from_model(model, neurons=True)
    same = TaskBatch(BATCH.clean, BATCH.clean, BATCH.answer, BATCH.wrong, BATCH.pos)
    if patcher == "edge":
        p = EdgePatcher(model, g, same, ablation="resample")
        every = torch.ones(1, g.n_edges, dtype=torch.bool)
    else:
        p = NodePatcher(model, g, same, ablation="resample")
        every = p.ablatable.unsqueeze(0)
    ref = plain_logits(model, BATCH.clean, BATCH.pos)
    assert torch.allclose(p.run_logits(every)[0], ref, atol=1e-5)
    assert torch.allclose(p.clean_logits, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "native"])
def test_all_edges_is_corrupted_run_and_none_is_clean(name, request):
    model = request.getfixturevalue(name)
    g = ComponentGraph.from_model(model)
    p = EdgePatcher(model, g, BATCH, ablation="resample")
    corrupted = plain_logits(model, BATCH.corrupt, BATCH.pos)
    clean = plain_logits(model, BATCH.clean, BATCH.pos)
    assert (corrupted - clean).abs().max() > 0.05
    out = p.run_logits(torch.stack([torch.ones(g.n_edges, dtype=torch.bool), torch.zeros(g.n_edges, dtype=torch.bool)]))
    assert torch.allclose(out[0], corrupted, atol=1e-5)
    assert torch.allclose(out[1], clean, atol=1e-5)
    assert torch.allclose(p.ablated_metric, logit_diff(corrupted, BATCH), atol=1e-5)
    assert torch.allclose(p.clean_metric, logit_diff(clean, BATCH), atol=1e-5)


def hand_mean_ablated_logits(model, graph, batch, per_position=False):
    """Every sender replaced by its mean over the real tokens of the clean prompts (hand-computed)."""
    model.set_use_attn_result(True)
    try:
        names = ["hook_embed", "hook_pos_embed"] + [f"blocks.{L}.attn.hook_result" for L in range(model.cfg.n_layers)] \
            + [f"blocks.{L}.hook_mlp_out" for L in range(model.cfg.n_layers)]
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.clean, names_filter=names)
            valid = valid_positions(batch).float()
            means = {}
            for n in names:
                a = cache[n].expand(batch.clean.shape[0], *cache[n].shape[1:])
                w = valid.view(*valid.shape, *([1] * (a.dim() - 2)))
                means[n] = (a * w).sum(0) / w.sum(0) if per_position else (a * w).sum((0, 1)) / w.sum()
            hooks = [(n, lambda x, hook, m=means[n]: m.expand_as(x).clone()) for n in names]
            with model.hooks(fwd_hooks=hooks):
                return gather_pos(model(batch.clean), batch.pos)
    finally:
        model.set_use_attn_result(False)


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_ablation_matches_hand_computed_means(gpt2, per_position):
    g = ComponentGraph.from_model(gpt2)
    want = hand_mean_ablated_logits(gpt2, g, BATCH, per_position)
    # the mean over every real token, BOS included (the old default; BOS is left out by default now: see
    # tests/test_engine_ablation.py)
    e = EdgePatcher(gpt2, g, BATCH, ablation="mean", per_position=per_position, mean_include_bos=True)
    n = NodePatcher(gpt2, g, BATCH, ablation="mean", per_position=per_position, mean_include_bos=True)
    assert torch.allclose(e.run_logits(torch.ones(1, g.n_edges, dtype=torch.bool))[0], want, atol=2e-5)
    assert torch.allclose(n.run_logits(n.ablatable.unsqueeze(0))[0], want, atol=2e-5)


def test_zero_ablation_all_edges_equals_all_nodes(llama):
    g = ComponentGraph.from_model(llama)
    e = EdgePatcher(llama, g, BATCH, ablation="zero")
    n = NodePatcher(llama, g, BATCH, ablation="zero")
    assert torch.allclose(e.ablated_metric, n.ablated_metric, atol=1e-5)
    # zero-ablating the embeddings alone: the model sees a zero residual stream (no biases in Llama)
    emb = n.run_logits(g.node_mask(["embed"]).unsqueeze(0))[0]
    assert torch.allclose(emb, torch.zeros_like(emb), atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "native"])
def test_batched_masks_equal_separate_runs(name, request):
    model = request.getfixturevalue(name)
    g = ComponentGraph.from_model(model, neurons=True)
    gen = torch.Generator().manual_seed(0)
    emasks = torch.rand(5, g.n_edges, generator=gen) < 0.3
    nmasks = torch.rand(5, g.n_nodes, generator=gen) < 0.2
    e = EdgePatcher(model, g, BATCH, ablation="resample")
    n = NodePatcher(model, g, BATCH, ablation="mean")
    nmasks &= n.ablatable
    together_e, together_n = e.run(emasks), n.run(nmasks)
    assert e.forward_passes - 3 == 1 and e.ablations == 5  # setup: clean, corrupt, all-ablated; then one call
    for k in range(5):
        assert torch.allclose(together_e[k], e.run(emasks[k:k + 1])[0], atol=1e-5)
        assert torch.allclose(together_n[k], n.run(nmasks[k:k + 1])[0], atol=1e-5)
    small = EdgePatcher(model, g, BATCH, ablation="resample", chunk_size=2)
    assert torch.allclose(small.run(emasks), together_e, atol=1e-5)
    assert small.forward_passes == 3 + 3


def test_node_patching_matches_hand_hooks(gpt2):
    g = ComponentGraph.from_model(gpt2, neurons=True)
    p = NodePatcher(gpt2, g, BATCH, ablation="resample")
    gpt2.set_use_attn_result(True)
    try:
        names = ["blocks.0.attn.hook_result", "blocks.1.hook_mlp_out", "blocks.0.mlp.hook_post", "hook_embed"]
        with torch.no_grad():
            _, src = gpt2.run_with_cache(BATCH.corrupt, names_filter=names)

        def head(x, hook):
            x = x.clone()
            x[:, :, 2] = src["blocks.0.attn.hook_result"][:, :, 2]
            return x

        def neuron(x, hook):
            x = x.clone()
            x[..., 5] = src["blocks.0.mlp.hook_post"][..., 5]
            return x
        cases = {"a0.h2": [("blocks.0.attn.hook_result", head)],
                 "m1": [("blocks.1.hook_mlp_out", lambda x, hook: src["blocks.1.hook_mlp_out"])],
                 "m0.n5": [("blocks.0.mlp.hook_post", neuron)],
                 "embed": [("hook_embed", lambda x, hook: src["hook_embed"])]}
        for node, hooks in cases.items():
            with torch.no_grad(), gpt2.hooks(fwd_hooks=hooks):
                want = gather_pos(gpt2(BATCH.clean), BATCH.pos)
            got = p.run_logits(g.node_mask([node]).unsqueeze(0))[0]
            assert torch.allclose(got, want, atol=2e-5), node
            assert (want - p.clean_logits).abs().max() > 1e-4, node
    finally:
        gpt2.set_use_attn_result(False)


def test_node_ablation_equals_ablating_its_outgoing_edges(llama):
    g = ComponentGraph.from_model(llama)
    e = EdgePatcher(llama, g, BATCH, ablation="resample")
    n = NodePatcher(llama, g, BATCH, ablation="resample")
    for node in ("a0.h1", "m0", "embed"):
        edges = torch.zeros(1, g.n_edges, dtype=torch.bool)
        edges[0, g.outgoing(node)] = True
        assert torch.allclose(e.run(edges), n.run(g.node_mask([node]).unsqueeze(0)), atol=1e-5), node


def test_block_patching_on_recurrent_model():
    m = mamba_bridge()
    g = ComponentGraph.from_model(m)
    p = NodePatcher(m, g, BATCH, ablation="resample")
    with torch.no_grad():
        _, src = m.run_with_cache(BATCH.corrupt, names_filter=["blocks.1.hook_in", "blocks.1.hook_out"])
    contrib = src["blocks.1.hook_out"] - src["blocks.1.hook_in"]
    seen = {}
    hooks = [("blocks.1.hook_in", lambda x, hook: seen.__setitem__("x", x)),
             ("blocks.1.hook_out", lambda x, hook: seen["x"] + contrib)]
    with torch.no_grad(), m.hooks(fwd_hooks=hooks):
        want = gather_pos(m(BATCH.clean), BATCH.pos)
    assert torch.allclose(p.run_logits(g.node_mask(["b1"]).unsqueeze(0))[0], want, atol=1e-5)
    every = p.run_logits(p.ablatable.unsqueeze(0))[0]
    assert torch.allclose(every, plain_logits(m, BATCH.corrupt, BATCH.pos), atol=1e-4)


def test_scores_functions_agree_with_single_runs(gpt2):
    g = ComponentGraph.from_model(gpt2, neurons=True)
    s = edge_patching_scores(gpt2, g, BATCH, ablation="resample", chunk_size=50)
    p = EdgePatcher(gpt2, g, BATCH, ablation="resample")
    for i in (0, 17, g.n_edges - 1):
        m = torch.zeros(1, g.n_edges, dtype=torch.bool)
        m[0, i] = True
        assert abs(float((p.run(m)[0] - p.clean_metric).mean()) - float(s.values[i])) < 1e-5
    # setup (clean, corrupted, all-ablated) + per chunk of 50 masks one pass per first-receiver stage in it
    start = p._runner.start(torch.eye(g.n_edges, dtype=torch.bool))
    assert s.ids == tuple(e.id for e in g.edges) and s.method == "patching"
    assert s.forward_passes == 3 + sum(len(set(start[i:i + 50].tolist())) for i in range(0, g.n_edges, 50))
    ns = node_patching_scores(gpt2, g, BATCH, ablation="zero")
    nn = node_patching_scores(gpt2, g, BATCH, ablation="zero", level="neuron")
    q = NodePatcher(gpt2, g, BATCH, ablation="zero")
    for node in ("a1.h3", "m0", "m1.n7"):
        want = float((q.run(g.node_mask([node]).unsqueeze(0))[0] - q.clean_metric).mean())
        assert abs(ns.as_dict()[node] - want) < 1e-5
    assert ns.as_dict()["logits"] == 0.0
    assert nn.as_dict()["m1.n7"] == pytest.approx(ns.as_dict()["m1.n7"], abs=1e-6) and len(nn) == g.n_neurons


def test_other_sizes_and_kl_metric():
    for model in (gpt2_bridge(n_layers=3, d_model=48, n_heads=6, seed=3), llama_bridge(n_layers=3, d_model=48,
                  n_heads=3, seed=4), native_bridge(n_layers=3, d_model=24, n_heads=2, seed=5),
                  native_bridge(normalization_type="LN", positional_embedding_type="rotary", seed=6)):
        g = ComponentGraph.from_model(model)
        p = EdgePatcher(model, g, BATCH, ablation="resample", metric="kl")
        assert torch.allclose(p.clean_metric, torch.zeros_like(p.clean_metric), atol=1e-5)
        corrupted = plain_logits(model, BATCH.corrupt, BATCH.pos)
        assert torch.allclose(p.run_logits(torch.ones(1, g.n_edges, dtype=torch.bool))[0], corrupted, atol=1e-4)


def test_projected_qkv_path_equals_split_path(gpt2, llama):
    for model in (gpt2, llama):
        g = ComponentGraph.from_model(model)
        masks = torch.rand(4, g.n_edges, generator=torch.Generator().manual_seed(1)) < 0.3
        split = EdgePatcher(model, g, BATCH, qkv_path="split").run(masks)
        proj = EdgePatcher(model, g, BATCH, qkv_path="projected").run(masks)
        assert torch.allclose(split, proj, atol=2e-5)


def test_bad_input_errors_and_cleanup(gpt2):
    g = ComponentGraph.from_model(gpt2)
    p = NodePatcher(gpt2, g, BATCH)
    with pytest.raises(ValueError, match=r"\[K, 13\]"):
        p.run(torch.ones(13, dtype=torch.bool))
    with pytest.raises(ValueError, match="logits node cannot be ablated"):
        p.run(g.node_mask(["logits"]).unsqueeze(0))
    with pytest.raises(ValueError, match="unknown ablation"):
        EdgePatcher(gpt2, g, BATCH, ablation="shuffle")
    with pytest.raises(ValueError, match="unknown metric"):
        EdgePatcher(gpt2, g, BATCH, metric="loss")
    # hooks removed and flags restored after runs and after errors
    assert all(not hp.fwd_hooks for hp in gpt2.hook_dict.values())
    assert not gpt2.cfg.use_split_qkv_input and not gpt2.training
