"""Edge-level patching on grouped-query attention (patching/gqa.py) against two oracles:

* the same weights as an ordinary multi-head model (k/v projections repeated per query head): exact edge
  and node patching, EAP and EAP-IG must agree to 1e-5, on both q/k/v paths, with and without suffix runs;
* hand-written hooks on the grouped model itself: a key edge rewrites one query head's attention scores
  (RoPE applied by transformers' own ``apply_rotary_pos_emb``), a value edge one head's ``z``.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import _wrap, random_batch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from patching import ComponentGraph, EdgePatcher, NodePatcher, eap, eap_ig
from patching.gqa import kv_groups, ungroup_reason, ungrouped
from patching.metrics import gather_pos
from patching.wiring import prepared

BATCH = random_batch(B=5, P=8, seed=4)
CFG = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=96, vocab_size=64,
           max_position_embeddings=16, initializer_range=0.15, bos_token_id=0, eos_token_id=0)


def gqa_pair(n_kv: int = 2, seed: int = 1, bias: bool = False):
    """(GQA bridge, the same model as multi-head attention): k/v weights repeated once per query head."""
    torch.manual_seed(seed)
    grouped = LlamaForCausalLM(LlamaConfig(num_key_value_heads=n_kv, attention_bias=bias, **CFG))
    with torch.no_grad():
        for name, p in grouped.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    full = LlamaForCausalLM(LlamaConfig(num_key_value_heads=CFG["num_attention_heads"], attention_bias=bias, **CFG))
    sd = {k: v.clone() for k, v in grouped.state_dict().items()}
    dh, g = CFG["hidden_size"] // CFG["num_attention_heads"], CFG["num_attention_heads"] // n_kv
    for k in sd:
        if ".k_proj." in k or ".v_proj." in k:
            w = sd[k]
            sd[k] = w.view(-1, dh, *w.shape[1:]).repeat_interleave(g, 0).flatten(0, 1)
    full.load_state_dict(sd, strict=True)
    return _wrap(grouped, "llama", CFG["vocab_size"]), _wrap(full, "llama", CFG["vocab_size"])


@pytest.fixture(scope="module")
def pair():
    return gqa_pair()


def test_graph_and_ungrouping_restore(pair):
    gq, mha = pair
    g, g2 = ComponentGraph.from_model(gq), ComponentGraph.from_model(mha)
    assert g.supports_edges and g.meta["n_kv_heads"] == 2 and kv_groups(gq) == 3 and ungroup_reason(gq) is None
    assert [e.id for e in g.edges] == [e.id for e in g2.edges] and g.meta["qkv_paths"] == ["projected", "split"]
    attn = gq.blocks[0].attn
    w, groups = attn.k.original_component.weight, attn.original_component.num_key_value_groups
    with torch.no_grad():
        want = gq(BATCH.clean)
        with ungrouped(gq):
            assert attn.k.original_component.weight.shape[0] == 6 * 8 and gq.cfg.n_key_value_heads == 6
            assert torch.allclose(gq(BATCH.clean), want, atol=1e-5)
        with pytest.raises(RuntimeError, match="boom"), ungrouped(gq):
            raise RuntimeError("boom")
    assert attn.k.original_component.weight is w and attn.original_component.num_key_value_groups == groups
    assert gq.cfg.n_key_value_heads == 2 and attn.config.n_key_value_heads == 2
    assert attn.k.hook_out.hook_conversion.n_heads == 2


@pytest.mark.parametrize("qkv", ["projected", "split"])
@pytest.mark.parametrize("suffix", [True, False])
def test_exact_edge_patching_equals_multi_head_model(pair, qkv, suffix):
    gq, mha = pair
    g, g2 = ComponentGraph.from_model(gq), ComponentGraph.from_model(mha)
    gen = torch.Generator().manual_seed(0)
    E = g.n_edges
    masks = torch.cat([torch.eye(E, dtype=torch.bool)[torch.randperm(E, generator=gen)[:40]],
                       torch.rand(8, E, generator=gen) < 0.2, torch.ones(1, E, dtype=torch.bool)])
    a = EdgePatcher(gq, g, BATCH, qkv_path=qkv, suffix=suffix, chunk_size=16).run_logits(masks)
    b = EdgePatcher(mha, g2, BATCH, qkv_path=qkv, suffix=suffix, chunk_size=16).run_logits(masks)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert float((b[-1] - b[0]).abs().max()) > 0.1


def test_node_patching_and_attribution_equal_multi_head_model(pair):
    gq, mha = pair
    g, g2 = ComponentGraph.from_model(gq), ComponentGraph.from_model(mha)
    n1, n2 = NodePatcher(gq, g, BATCH), NodePatcher(mha, g2, BATCH)
    masks = torch.eye(g.n_nodes, dtype=torch.bool)[n1.ablatable]
    assert torch.allclose(n1.run(masks), n2.run(masks), atol=1e-5)
    for fn in (eap, lambda *a, **k: eap_ig(*a, steps=3, **k)):
        for ablation in ("resample", "mean"):
            s1, s2 = fn(gq, g, BATCH, ablation=ablation), fn(mha, g2, BATCH, ablation=ablation)
            assert torch.allclose(s1.values, s2.values, atol=1e-5), float((s1.values - s2.values).abs().max())
            assert s2.values.abs().max() > 0.05


def test_biased_gqa_model_equals_multi_head_model():
    gq, mha = gqa_pair(n_kv=3, seed=2, bias=True)
    g, g2 = ComponentGraph.from_model(gq), ComponentGraph.from_model(mha)
    masks = torch.rand(6, g.n_edges, generator=torch.Generator().manual_seed(3)) < 0.1
    assert torch.allclose(EdgePatcher(gq, g, BATCH).run(masks), EdgePatcher(mha, g2, BATCH).run(masks), atol=1e-5)
    assert torch.allclose(eap(gq, g, BATCH).values, eap(mha, g2, BATCH).values, atol=1e-5)


# ---- hand-written hooks on the grouped model ------------------------------------------------------

def hand_gqa_logits(model, graph, batch, edges):
    """Logits at pos with ``edges`` resample-ablated by explicit hooks on the *grouped* model: q edges add
    ``source - current`` to one head's ``hook_q_input``; a k edge recomputes head h's attention scores with the
    key ``ln1(x + d) @ W_K[h // g]`` rotated by transformers' RoPE; a v edge recomputes head h's ``z`` as
    ``pattern_h @ (ln1(x + d) @ W_V[h // g])``; MLP / logits edges add to ``ln2.hook_in`` / ``ln_final.hook_in``."""
    G = kv_groups(model)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    try:
        def sender(x_by_name, s):
            if s == "embed":
                return x_by_name["hook_embed"]
            L = int(s[1:].split(".")[0])
            if s.startswith("m"):
                return x_by_name[f"blocks.{L}.hook_mlp_out"]
            return x_by_name[f"blocks.{L}.attn.hook_result"][:, :, int(s.split(".h")[1])]

        names = ["hook_embed"] + [f"blocks.{L}.{n}" for L in range(model.cfg.n_layers)
                                  for n in ("attn.hook_result", "hook_mlp_out")]
        with torch.no_grad():
            _, src = model.run_with_cache(batch.corrupt, names_filter=names)
        cur: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def fn(x, hook):  # hook.name is the canonical name; keep the alias asked for
                cur[name] = seen[name] = x
            return fn

        hooks = [(n, keep(n)) for n in names]
        hooks += [(f"blocks.{L}.{n}", keep(f"blocks.{L}.{n}")) for L in range(model.cfg.n_layers)
                  for n in ("ln1.hook_in", "attn.hook_rot_q", "attn.hook_cos", "attn.hook_sin", "attn.hook_pattern")]
        by: dict[tuple, list] = {}
        for eid in edges:
            e = graph.edges[graph.edge_index[eid]]
            r = graph.node(e.receiver)
            by.setdefault((r.kind, r.layer, e.input), []).append((e.sender, r.head))

        def delta(s):
            return sender(src, s) - sender(cur, s)

        def q_hook(items):
            def fn(x, hook):
                x = x.clone()
                for s, h in items:
                    x[:, :, h] += delta(s)
                return x
            return fn

        def resid_hook(items):
            def fn(x, hook):
                return x + sum(delta(s) for s, _ in items)
            return fn

        def changed_input(L, items, h):
            attn = model.blocks[L].attn
            x = seen[f"blocks.{L}.ln1.hook_in"] + sum(delta(s) for s, hh in items if hh == h)
            return model.blocks[L].ln1.original_component(x), attn  # the HF norm: no hooks fire

        def k_hook(L, items):
            def fn(scores, hook):  # [B, H, Q, K], masked, pre-softmax
                scores = scores.clone()
                for h in sorted({hh for _, hh in items}):
                    y, attn = changed_input(L, items, h)
                    k = torch.einsum("bpd,de->bpe", y, attn.W_K[h // G])[:, None]         # [B, 1, P, dh]
                    q = seen[f"blocks.{L}.attn.hook_rot_q"][:, :, h][:, None]              # [B, 1, P, dh]
                    _, k_rot = apply_rotary_pos_emb(q, k, seen[f"blocks.{L}.attn.hook_cos"],
                                                    seen[f"blocks.{L}.attn.hook_sin"])
                    s = (q @ k_rot.transpose(-1, -2))[:, 0] * attn.original_component.scaling
                    P = s.shape[-1]
                    causal = torch.ones(P, P, dtype=torch.bool).tril()
                    scores[:, h] = torch.where(causal, s, scores[:, h])
                return scores
            return fn

        def v_hook(L, items):
            def fn(z, hook):  # [B, P, H, dh]
                z = z.clone()
                for h in sorted({hh for _, hh in items}):
                    y, attn = changed_input(L, items, h)
                    v = torch.einsum("bpd,de->bpe", y, attn.W_V[h // G])
                    z[:, :, h] = seen[f"blocks.{L}.attn.hook_pattern"][:, h] @ v
                return z
            return fn

        for (kind, L, inp), items in by.items():
            if kind == "attn_head" and inp == "q":
                hooks.append((f"blocks.{L}.attn.hook_q_input", q_hook(items)))
            elif kind == "attn_head" and inp == "k":
                hooks.append((f"blocks.{L}.attn.hook_attn_scores", k_hook(L, items)))
            elif kind == "attn_head":
                hooks.append((f"blocks.{L}.attn.hook_z", v_hook(L, items)))
            elif kind == "mlp":
                hooks.append((f"blocks.{L}.ln2.hook_in", resid_hook(items)))
            else:
                hooks.append(("ln_final.hook_in", resid_hook(items)))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            return gather_pos(model(batch.clean), batch.pos)
    finally:
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)


GQA_EDGE_SETS = [
    ["a0.h1->a1.h2<k>"], ["a0.h4->a1.h3<k>"], ["embed->a2.h5<v>"], ["a1.h0->a2.h1<v>"], ["a0.h3->a2.h0<q>"],
    # heads 0, 1, 2 share one k/v head: patching head 1's keys must leave heads 0 and 2 alone
    ["a0.h2->a1.h1<k>", "a0.h2->a1.h1<v>"],
    ["a0.h1->a1.h2<v>", "a1.h2->a2.h4<k>", "m0->a2.h4<k>", "a2.h4->logits", "a1.h2->m2"],
]


def test_gqa_edges_match_hand_written_hooks(pair):
    gq, _ = pair
    g = ComponentGraph.from_model(gq)
    clean = None
    with torch.no_grad(), prepared(gq):
        clean = gather_pos(gq(BATCH.clean), BATCH.pos)
    assert torch.allclose(hand_gqa_logits(gq, g, BATCH, []), clean, atol=1e-5)  # the hand hooks are the identity
    for qkv in ("projected", "split"):
        p = EdgePatcher(gq, g, BATCH, qkv_path=qkv)
        got = p.run_logits(torch.stack([g.edge_mask(s) for s in GQA_EDGE_SETS]))
        for k, edges in enumerate(GQA_EDGE_SETS):
            want = hand_gqa_logits(gq, g, BATCH, edges)
            assert torch.allclose(got[k], want, atol=2e-5), (qkv, edges, float((got[k] - want).abs().max()))
            assert (want - clean).abs().max() > 1e-3, f"{edges} has no effect: weak oracle"
