"""Exemplar selection against a brute-force numpy computation, determinism, the held-out split, windows and
token decoding, and the store path end to end on a zoo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainers.exemplars import (
    ExemplarConfig,
    StoreIndex,
    exemplars_for_units,
    held_out_documents,
    select_windows,
    token_strings,
    unit_activations,
)


def synthetic_rows(seed: int = 0, n_ctx: int = 120, n_units: int = 3):
    """Contexts of random length (3..20 rows), shuffled row order, documents of 1-2 contexts each."""
    rng = np.random.default_rng(seed)
    ctx, pos, doc = [], [], []
    d = 0
    for c in range(n_ctx):
        L = int(rng.integers(3, 21))
        ctx += [c * 7 + 3] * L                  # context ids need not be 0..C-1
        pos += list(range(1, L + 1))            # position 0 is BOS, never a row
        doc += [d] * L
        if rng.random() < 0.6:
            d += 1
    acts = rng.normal(size=(len(ctx), n_units)).astype(np.float32)
    acts[:, 1] = np.round(acts[:, 1], 1)        # many ties for unit 1
    perm = rng.permutation(len(ctx))
    return acts[perm], np.array(ctx)[perm], np.array(pos)[perm], np.array(doc)[perm]


def brute_force(acts, ctx, pos, doc, j, cfg):
    """Per context: max activation of unit j, the (position of the) first row reaching it, side."""
    out = {}
    for c in sorted(set(ctx.tolist())):
        rows = sorted(np.flatnonzero(ctx == c), key=lambda r: pos[r])
        vals = [float(acts[r, j]) for r in rows]
        m = max(vals)
        peak = rows[vals.index(m)]
        held = bool(held_out_documents(np.array([doc[rows[0]]]), cfg.holdout, cfg.seed)[0])
        out[c] = {"max": m, "peak": peak, "rows": rows, "held": held}
    return out


UNITS = ["u0", "u1", "u2"]
CFG = ExemplarConfig(window=6, before=0.5, explain_top=4, explain_random=2, explain_per_quantile=1,
                     held_out_top=3, held_out_random=3, held_out_per_quantile=2, n_quantiles=4, seed=3)


def test_top_windows_and_quantile_bins_match_brute_force():
    acts, ctx, pos, doc = synthetic_rows()
    got = select_windows(acts, ctx, pos, doc, UNITS, CFG)
    for j, u in enumerate(UNITS):
        bf = brute_force(acts, ctx, pos, doc, j, CFG)
        for side in ("explain", "held_out"):
            cand = [c for c, v in bf.items() if v["held"] == (side == "held_out")]
            n_top, n_random, per_q = CFG.counts(side)
            ws = [w for w in got[u] if w.side == side]
            top = [w for w in ws if w.source == "top"]
            expected = sorted(cand, key=lambda c: (-bf[c]["max"], c))[:n_top]
            assert [w.context for w in top] == expected
            for w in top:
                b = bf[w.context]
                assert w.peak == b["peak"] and w.peak in w.rows
                assert list(w.rows) == b["rows"][b["rows"].index(w.rows[0]):][:len(w.rows)]  # consecutive
                assert len(w.rows) == min(CFG.window, len(b["rows"]))
                k = list(w.rows).index(w.peak)
                # the peak sits `before` into the window unless the context's edges push it
                want = min(int(np.floor(CFG.before * (CFG.window - 1))), b["rows"].index(w.peak))
                assert k == want or list(w.rows)[-1] == b["rows"][-1]
            # quantile bins: active contexts not taken as top, ascending by max, equal-count bins
            active = sorted([c for c in cand if bf[c]["max"] > 0 and c not in expected],
                            key=lambda c: (bf[c]["max"], c))
            bins = [list(b) for b in np.array_split(np.array(active), CFG.n_quantiles)]
            for q, b in enumerate(bins):
                qs = [w.context for w in ws if w.source == f"quantile:{q + 1}/{CFG.n_quantiles}"]
                assert len(qs) == min(per_q, len(b)) and set(qs) <= set(b)
            rnd = [w for w in ws if w.source == "random"]
            assert len(rnd) == min(n_random, len(cand) - len(top) - sum(min(per_q, len(b)) for b in bins))
            assert all(w.peak is None and len(w.rows) == min(CFG.window, len(bf[w.context]["rows"])) for w in rnd)
            assert len({w.context for w in ws}) == len(ws)  # no context twice on one side


def test_split_is_by_document_and_sides_never_overlap():
    acts, ctx, pos, doc = synthetic_rows(1)
    got = select_windows(acts, ctx, pos, doc, UNITS, CFG)
    for u in UNITS:
        docs = {s: {int(doc[w.rows[0]]) for w in got[u] if w.side == s} for s in ("explain", "held_out")}
        assert docs["explain"] and docs["held_out"] and not docs["explain"] & docs["held_out"]
        for w in got[u]:
            assert set(doc[list(w.rows)].tolist()) == {w.document}
            assert held_out_documents(np.array([w.document]), CFG.holdout, CFG.seed)[0] == (w.side == "held_out")
    share = held_out_documents(np.arange(20000), 0.3, 0).mean()
    assert abs(share - 0.3) < 0.015
    # the split of a document does not depend on which other documents exist
    assert (held_out_documents(np.arange(50), 0.3, 0) == held_out_documents(np.arange(100), 0.3, 0)[:50]).all()


def test_deterministic_and_independent_of_the_other_units():
    acts, ctx, pos, doc = synthetic_rows(2)
    a = select_windows(acts, ctx, pos, doc, UNITS, CFG)
    b = select_windows(acts, ctx, pos, doc, UNITS, CFG)
    assert a == b
    alone = select_windows(acts[:, [2]], ctx, pos, doc, ["u2"], CFG)
    assert alone["u2"] == a["u2"]
    other = select_windows(acts, ctx, pos, doc, UNITS, ExemplarConfig(**{**CFG.to_dict(), "seed": 4}))
    assert other != a


def test_bad_config_and_inputs_are_refused():
    with pytest.raises(ValueError, match="window"):
        ExemplarConfig(window=0)
    with pytest.raises(ValueError, match="held-out share"):
        ExemplarConfig(holdout=1.0)
    with pytest.raises(ValueError, match="no exemplars requested for the held_out side"):
        ExemplarConfig(held_out_top=0, held_out_random=0, held_out_per_quantile=0)
    acts, ctx, pos, doc = synthetic_rows()
    with pytest.raises(ValueError, match="activations must be"):
        select_windows(acts, ctx, pos, doc, ["a"], CFG)
    bad = acts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        select_windows(bad, ctx, pos, doc, UNITS, CFG)


def test_token_strings_join_to_the_decoded_text(zoo_model, smollm2):
    for model in (zoo_model("ioi-2l"), smollm2):
        tok = model.tokenizer
        text = "When Mary and John went to the store , John gave a drink to Mary"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        strs = token_strings(tok, ids[3:], anchor=ids[2])
        assert len(strs) == len(ids) - 3
        assert "".join(strs) == tok.decode(ids, clean_up_tokenization_spaces=False)[len(tok.decode(ids[:3])):]
        assert strs[0].startswith(" ") and strs[0].strip() == "John"  # leading space inside the text kept
        assert token_strings(tok, ids[:1], anchor=tok.bos_token_id) == ("When",)
    # a character split over byte-level tokens: each token decoded alone, for the whole window
    ids = smollm2.tokenizer("naïve 日本", add_special_tokens=False)["input_ids"]
    strs = token_strings(smollm2.tokenizer, ids)
    assert len(strs) == len(ids)


def test_store_path_end_to_end(zoo_model, tmp_path):
    from explainers.bases import HeadBasis, NeuronBasis
    from explainers.corpus import TextsCorpus
    from explainers.store import StoreConfig, collect

    m = zoo_model("ioi-2l")
    from circuits.tasks import get_task

    texts = [p.clean + p.answer for p in get_task("ioi", n=200, seed=1).pairs]
    hooks = ("blocks.0.mlp.hook_post", "blocks.1.attn.hook_z")
    cfg = StoreConfig(model="ioi-2l", hooks=hooks, n_tokens=1500, seq_len=12, batch_size=16, shard_batches=2)
    store = collect(m, TextsCorpus("ioi", tuple(texts)), cfg, tmp_path / "store", progress=False)
    neurons, heads = NeuronBasis.from_model(m, 0), HeadBasis.from_model(m, 1)
    # activations: the basis applied to the stored rows, columns selected
    acts = unit_activations(store, hooks[1], heads, [2, 0])
    z = store.read(hooks[1])
    assert torch.allclose(acts, heads.encode(z)[:, [2, 0]])
    ecfg = ExemplarConfig(window=8, explain_top=5, held_out_top=3, held_out_random=3, held_out_per_quantile=1)
    units = ["m0.n5", "m0.n40"]
    ex = exemplars_for_units(store, hooks[0], neurons, [5, 40], units, m.tokenizer, ecfg)
    index = StoreIndex(store)
    x = store.read(hooks[0])
    for j, u in zip([5, 40], units, strict=True):
        e = ex[u]
        assert len(e.explain) == 5 and len(e.held_out) == 3 + 5 + 3  # top, one per quantile, random
        assert not set(e.ids("explain")) & set(e.ids("held_out"))
        for ex_ in e.explain + e.held_out:
            # activations and tokens are those of the stored rows of that document window
            rows = np.flatnonzero((index.row_document == ex_.document) &
                                  (index.row_doc_position >= ex_.doc_start) &
                                  (index.row_doc_position < ex_.doc_start + len(ex_.tokens)))
            assert np.allclose(x[rows, j].numpy(), ex_.activations)
            ctx = index.context_tokens(ex_.context)
            anchor = int(ctx[int(index.row_position[rows[0]]) - 1])
            full = m.tokenizer.decode([anchor, *ex_.token_ids], clean_up_tokenization_spaces=False)
            assert "".join(ex_.tokens) == full[len(m.tokenizer.decode([anchor])):]
            r = ex_.to_record()
            assert r.id == ex_.id and r.id == f"doc{ex_.document}:{ex_.doc_start}-{ex_.doc_start + len(r.tokens)}"
        # the explain side's top exemplar is the train side's largest activation
        train = ~held_out_documents(index.row_document, ecfg.holdout, ecfg.seed)
        assert max(e.explain[0].activations) == pytest.approx(float(x[train, j].max()))
    again = exemplars_for_units(store, hooks[0], neurons, [40], ["m0.n40"], m.tokenizer, ecfg)
    assert again["m0.n40"] == ex["m0.n40"]
    assert type(ex["m0.n5"]).from_dict(ex["m0.n5"].to_dict()) == ex["m0.n5"]
