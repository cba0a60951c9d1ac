"""Self-explanation (Patchscopes / SelfIE): the patch is exactly a token substitution when the direction is
that token's embedding at layer 0; the scale rule picks the largest log-prob gain; zoo and smollm2 yields."""

from __future__ import annotations

import pytest
import torch

from explainers import selfexplain as se


def test_patching_an_embedding_at_layer_0_equals_writing_the_token(zoo_model):
    m = zoo_model("ioi-2l")  # rotary positions: resid_pre of layer 0 is the token embedding alone
    ids, positions, name = se.prompt_ids(m, "patchscope")
    assert name == "patchscope" and len(positions) == 6
    t = m.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        patched = se._logits(m, torch.tensor([ids]), "blocks.0.hook_resid_pre", m.W_E[t][None], positions)
        written = list(ids)
        for p in positions:
            written[p] = t
        ref = m(torch.tensor([written]))
    assert torch.allclose(patched, ref, atol=1e-5)


def test_regression_zoo_ioi_model_names_itself(zoo_model):
    """On the word-level IOI model the interpretation prompt is out of distribution: the continuation is a
    run of names. A name's embedding yields that name (measured: "Mary Mary Mary Mary Paul Mary", "John John
    John ..."), a non-name word ("store") yields other names."""
    m = zoo_model("ioi-2l")
    words = [" Mary", " John", " Alice", " store"]
    ids = [m.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    res = se.self_explain_many(m, m.W_E[ids], layer=0, scales=(1.0, 4.0), max_new_tokens=6)
    for w, r in zip(words[:3], res[:3], strict=True):
        assert w.strip() in r.text.split(), (w, r.text)
    assert "store" not in res[3].text
    for r in res:  # the stated rule: the candidate with the largest log-prob gain wins
        assert r.scale == max((c for c in r.candidates if c.pmi is not None), key=lambda c: c.pmi).scale
    again = se.self_explain(m, m.W_E[ids[0]], layer=0, scales=(1.0, 4.0), max_new_tokens=6)
    assert again.to_dict() == res[0].to_dict()


def test_bad_inputs_are_one_line_errors(zoo_model):
    m = zoo_model("ioi-2l")
    with pytest.raises(ValueError, match="d_model is 128|must be \\[n, 128\\]"):
        se.self_explain(m, torch.ones(5), layer=0)
    with pytest.raises(ValueError, match="layer 7 out of range"):
        se.self_explain(m, torch.ones(128), layer=7)
    with pytest.raises(ValueError, match="non-zero"):
        se.self_explain(m, torch.zeros(128), layer=0)
    with pytest.raises(ValueError, match="unknown self-explanation prompt"):
        se.prompt_ids(m, "nope")


def test_regression_smollm2_words_self_explain_to_themselves(smollm2):
    """SmolLM2-135M-Instruct, a word's input embedding patched at layer 0 into "X X X X X. The meaning of X
    is": some scale's continuation names the word for most words (measured 4 of 4, e.g. guitar -> "to play
    the guitar."), and the chosen continuation is closer (all-MiniLM cosine) to its own word than to the
    other words."""
    from explainers.scoring.embedding import embed

    words = [" dog", " guitar", " doctor", " water"]
    ids = [smollm2.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    res = se.self_explain_many(smollm2, smollm2.W_E[ids], layer=0, scales=(1.0, 2.0, 4.0, 8.0), max_new_tokens=8)
    named = sum(any(w.strip() in c.text.lower() for c in r.candidates) for w, r in zip(words, res, strict=True))
    assert named >= 3, [[c.text for c in r.candidates] for r in res]
    assert all(r.text for r in res)
    sims = embed([w.strip() for w in words]) @ embed([r.text for r in res]).T  # [word, continuation]
    own = sims.diagonal()
    assert (sims.argmax(0) == range(len(words))).sum() >= 3, sims
    assert own.mean() > (sims.sum() - own.sum()) / (len(words) ** 2 - len(words))


def test_selfie_prompt_uses_the_chat_template(smollm2):
    ids, positions, name = se.prompt_ids(smollm2, "selfie")
    text = smollm2.tokenizer.decode(ids)
    assert name == "selfie" and len(positions) == 5
    assert text.startswith("<|im_start|>") and text.endswith(se.SELFIE_ASSISTANT)
    user = text.index("<|im_start|>user")
    assert all(user < len(smollm2.tokenizer.decode(ids[:p])) < text.index("<|im_start|>assistant")
               for p in positions)
