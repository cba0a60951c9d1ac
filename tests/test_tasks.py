"""Task generators, JSONL loading and validation, and the zoo tokenizer they rely on."""

from __future__ import annotations

import json
import re

import pytest

from circuits.tasks import TASKS, get_task, load_jsonl, validate
from circuits.tasks.base import encode
from circuits.tasks.dyck import CLOSER, closers
from circuits.tasks.vocab import INDUCTION_WORDS, NAMES, YEARS
from circuits.zoo.tokenizer import load_saved_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo-tok")
    save_tokenizer(d)
    return load_saved_tokenizer(d)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_gpt2_like_splits(tok):
    texts = [TASKS[name](n=8, seed=1).pairs[i].clean for name in TASKS for i in range(8)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    # years split like GPT-2: " 17" + "32"; the answer "33" is one token without a space
    assert tok.convert_ids_to_tokens(encode(tok, " year 1732", False)) == ["▁year", "▁17", "32"]
    assert len(encode(tok, "33", False)) == 1
    # with special tokens the tokenizer prepends <bos> itself
    assert tok.encode("The war")[0] == tok.bos_token_id == 0


def test_tokenizer_vocabulary(tok):
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<bos>", "<eos>", "<pad>", "<unk>"]
    assert len(NAMES) >= 40
    for w in NAMES + INDUCTION_WORDS:
        assert len(encode(tok, " " + w, False)) == 1, w
    for y in YEARS:
        assert len(encode(tok, y, False)) == 1 and len(encode(tok, " " + y, False)) == 1
    for b in "()[]{}":
        assert len(encode(tok, b, False)) == 1
    assert encode(tok, " zyzzyva", False) == [tok.unk_token_id]
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "Mary"}], tokenize=False) \
        == "<bos>Mary"


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generator_deterministic_and_well_formed(name, tok):
    a, b, c = TASKS[name](n=40, seed=3), TASKS[name](n=40, seed=3), TASKS[name](n=40, seed=4)
    assert a == b and a.pairs != c.pairs
    assert len(a) == 40 and a.source == f"generator:{name} seed=3 n=40"
    validate(a, tok)                                   # equal lengths, single-token known answers
    batch = a.batch(tok)
    assert bool((batch.answer != batch.wrong).all())
    assert all(p.clean != p.corrupt for p in a.pairs)


def test_ioi_structure():
    task = TASKS["ioi"](n=200, seed=0)
    orders = set()
    for p in task.pairs:
        io, s = p.answer.strip(), p.wrong.strip()
        words = re.findall(r"[A-Za-z]+", p.clean)
        assert words.count(io) == 1 and words.count(s) == 2        # S repeated, IO once
        orders.add("ABBA" if words.index(io) < words.index(s) else "BABA")
        cw = re.findall(r"[A-Za-z]+", p.corrupt)
        names = [w for w in cw if w in NAMES]
        assert len(set(names)) == 3 and io not in cw and s not in cw  # ABC: three fresh names
    assert orders == {"ABBA", "BABA"}


def test_greater_than_structure():
    for p in TASKS["greater_than"](n=100, seed=0).pairs:
        m = re.fullmatch(r"The \w+ lasted from the year (\d\d)(\d\d) to the year (\d\d)", p.clean)
        assert m and m.group(1) == m.group(3)
        yy = int(m.group(2))
        assert 2 <= yy <= 98 and p.answer == f"{yy + 1:02d}" and p.wrong == f"{yy - 1:02d}"
        assert p.corrupt == p.clean.replace(f"year {m.group(1)}{m.group(2)}", f"year {m.group(1)}01")


def test_induction_structure():
    for p in TASKS["induction"](n=100, seed=0).pairs:
        words, corrupt = p.clean.split(), p.corrupt.split()
        last = words[-1]
        assert words.count(last) == 2 and corrupt.count(last) == 1   # the current word occurred once before
        first = words.index(last)                                    # ... except in the corrupted prompt
        assert words[first + 1] == p.answer.strip() and corrupt[first + 1] == p.wrong.strip()
        assert len(words) == len(corrupt)


def test_dyck_structure():
    for p in TASKS["dyck"](n=100, seed=0).pairs:
        assert p.clean[-1] in CLOSER.values()                      # last token closes something
        assert closers(p.clean)[-1] == p.answer and closers(p.corrupt)[-1] == p.wrong
        diff = [i for i, (a, b) in enumerate(zip(p.clean, p.corrupt, strict=True)) if a != b]
        assert len(diff) == 1 and p.answer != p.wrong


def test_get_task_resolves_names_and_files(tmp_path):
    assert get_task("ioi", n=3, seed=1) == TASKS["ioi"](n=3, seed=1)
    assert get_task("dyck", n=2, metric="accuracy").metric == "accuracy"
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"clean": "a", "corrupt": "b", "answer": " c", "wrong": " d"}) + "\n")
    assert get_task(str(f)).sources == (f"{f}:1",)
    with pytest.raises(ValueError, match="unknown task 'nope'.*induction"):
        get_task("nope")


# ---------------------------------------------------------------- JSONL


GOOD = {"clean": "When Mary and John went to the store, John gave a drink to",
        "corrupt": "When Alice and Peter went to the store, Paul gave a drink to", "answer": " Mary", "wrong": " John"}


def _write(tmp_path, lines):
    f = tmp_path / "task.jsonl"
    f.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return f


def test_load_jsonl_good(tmp_path, tok):
    f = _write(tmp_path, [{**GOOD, "metric": "prob_diff"}, "", GOOD])
    task = load_jsonl(f)
    assert task.name == "task" and task.metric == "prob_diff" and len(task) == 2
    assert task.sources == (f"{f}:1", f"{f}:3")
    assert load_jsonl(f, metric="accuracy").metric == "accuracy"
    validate(task, tok)


@pytest.mark.parametrize("line, reason", [
    ('{"clean": "a", "corrupt": ', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "wrong"}), r"missing key\(s\) \['wrong'\]"),
    (json.dumps({**GOOD, "label": 1}), r"unexpected key\(s\) \['label'\]"),
    (json.dumps({**GOOD, "answer": 3}), "'answer' must be a string"),
    (json.dumps({**GOOD, "clean": " "}), "'clean' is empty"),
    (json.dumps({**GOOD, "metric": "bleu"}), "unknown metric 'bleu'"),
    (json.dumps({**GOOD, "metric": "accuracy"}), "conflicts with 'logit_diff'"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, line, reason):
    f = _write(tmp_path, [{**GOOD, "metric": "logit_diff"}, line])
    with pytest.raises(ValueError, match=reason) as e:
        load_jsonl(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: ") and "\n" not in msg


def test_load_jsonl_empty_and_missing(tmp_path):
    f = _write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match=f"^{re.escape(str(f))}: empty file"):
        load_jsonl(f)
    with pytest.raises(FileNotFoundError, match="no such task file"):
        load_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("bad, reason", [
    ({**GOOD, "corrupt": "When Alice went to the store, Paul gave a drink to"},
     "clean and corrupt tokenize to different lengths"),
    ({**GOOD, "answer": " Mary Mary"}, "answer ' Mary Mary' is 2 tokens"),
    ({**GOOD, "wrong": " Zaphod"}, "wrong ' Zaphod' is not in the model's vocabulary"),
    ({**GOOD, "clean": "When Mary and Zaphod went to the store, John gave a drink to"},
     r"clean prompt has word\(s\) not in the model's vocabulary: \['Zaphod'\]"),
])
def test_validate_names_the_line(tmp_path, tok, bad, reason):
    f = _write(tmp_path, [GOOD, GOOD, bad])
    task = load_jsonl(f)
    with pytest.raises(ValueError, match=reason) as e:
        validate(task, tok)
    assert str(e.value).startswith(f"{f}:3: ") and "\n" not in str(e.value)
