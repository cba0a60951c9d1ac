"""The activation store: rows against per-context forward passes, budget and positions, exactly-once streaming,
and a collection killed midway (SIGKILL of a subprocess) that resumes byte-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from explainers.capture import capture
from explainers.corpus import JsonlCorpus, TextsCorpus
from explainers.store import ActivationStore, StoreConfig, collect

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post")


def ioi_texts(n=120, seed=0):
    from circuits.tasks import get_task

    return tuple(p.clean + p.answer for p in get_task("ioi", n=n, seed=seed).pairs)


def small_cfg(name="ioi-2l", hooks=HOOKS, n_tokens=700, **kw):
    base = dict(seq_len=12, batch_size=4, shard_batches=2)
    base.update(kw)
    return StoreConfig(model=name, hooks=hooks, n_tokens=n_tokens, **base)


@pytest.mark.parametrize("name,hooks", [("ioi-2l", HOOKS), ("ioi-2l-gpt2", ("blocks.1.hook_resid_pre",)),
                                        ("ioi-mamba", ("blocks.0.hook_resid_post",))])
def test_rows_equal_each_context_run_alone(zoo_model, tmp_path, name, hooks):
    m = zoo_model(name)
    cfg = small_cfg(name, hooks)
    store = collect(m, TextsCorpus("ioi", ioi_texts()), cfg, tmp_path, progress=False)
    assert store.n_rows == cfg.n_tokens                              # the budget, exactly
    assert store.n_shards > 2
    for row in range(0, store.n_rows, 37):
        toks, pos = store.context(row)
        assert toks[0] == m.tokenizer.bos_token_id and pos >= 1      # BOS never stored
        # oracle: the context alone, unpadded, full forward (no early stop)
        ref = capture(m, hooks, torch.tensor([toks]), stop_early=False)
        s, r = store.locate(row)
        for h in hooks:
            got = store.tensor(s, f"acts.{h}")[r]
            torch.testing.assert_close(got, ref[h][0, pos].flatten(), atol=2e-5, rtol=2e-5)


def test_positions_point_into_the_documents(zoo_model, tmp_path):
    m = zoo_model("ioi-2l")
    texts = ioi_texts(40)
    store = collect(m, TextsCorpus("ioi", texts), small_cfg(n_tokens=300), tmp_path, progress=False)
    docs = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = m.tokenizer.pad_token_id
    for s in range(store.n_shards):
        doc = store.tensor(s, "row_document")
        dpos = store.tensor(s, "row_doc_position")
        first = store.shards[s]["first_row"]
        for r in range(len(doc)):
            toks, pos = store.context(first + r)
            assert toks[pos] == docs[int(doc[r])][int(dpos[r])] != pad
    mf = json.loads((tmp_path / "manifest.json").read_text())
    assert mf["complete"] and mf["n_rows"] == 300
    st = mf["settings"]
    assert st["config"]["hooks"] == list(HOOKS) and st["config"]["model"] == "ioi-2l"
    assert st["config"]["dtype"] == "float32" and st["corpus"]["kind"] == "texts"
    assert st["hook_shapes"] == {"blocks.0.hook_resid_post": [128], "blocks.1.mlp.hook_post": [256]}


def test_capture_stops_after_the_last_needed_hook(zoo_model):
    m = zoo_model("ioi-2l")
    toks = torch.tensor([[0, 5, 9, 33, 70]])
    fired = []
    with m.hooks(fwd_hooks=[("ln_final.hook_in", lambda x, hook: fired.append(1))]):
        early = capture(m, ["blocks.0.hook_resid_post"], toks)
    assert fired == []                                              # layer 1 and the unembedding never ran
    full = capture(m, ["blocks.0.hook_resid_post"], toks, stop_early=False)
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


def test_shuffled_streaming_covers_each_row_once_per_epoch(zoo_model, tmp_path):
    m = zoo_model("ioi-2l")
    store = collect(m, TextsCorpus("ioi", ioi_texts()), small_cfg(n_tokens=900), tmp_path, progress=False)
    hook = HOOKS[0]
    everything = store.read(hook)
    orders = []
    for epoch in (0, 1):
        rows, xs = [], []
        for x, r in store.batches(hook, 64, seed=5, epoch=epoch, buffer_shards=3, with_rows=True):
            rows.append(r)
            xs.append(x)
        rows = torch.cat(rows)
        assert sorted(rows.tolist()) == list(range(store.n_rows))     # every row exactly once
        assert torch.equal(torch.cat(xs), everything[rows])           # each with its own activation
        assert rows.tolist() != list(range(store.n_rows))
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])                      # epochs differ
    again = torch.cat([r for _, r in store.batches(hook, 64, seed=5, epoch=0, buffer_shards=3, with_rows=True)])
    assert torch.equal(again, orders[0])                               # seeded
    sizes = [len(x) for x in store.batches(hook, 64, seed=5, drop_last=True)]
    assert set(sizes) == {64} and sum(sizes) == store.n_rows // 64 * 64


def test_other_settings_in_the_same_directory_are_refused(zoo_model, tmp_path):
    m = zoo_model("ioi-2l")
    c = TextsCorpus("ioi", ioi_texts(40))
    collect(m, c, small_cfg(n_tokens=100), tmp_path, progress=False)
    with pytest.raises(ValueError, match="config.n_tokens differs"):
        collect(m, c, small_cfg(n_tokens=200), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no hook 'blocks.7.hook_resid_post'"):
        collect(m, c, small_cfg(hooks=("blocks.7.hook_resid_post",)), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no activations for hook"):
        ActivationStore(tmp_path).read("blocks.1.hook_resid_pre")


VICTIM = """
import sys, time, torch
torch.set_num_threads(1)
from circuits.models import load_model
from explainers.corpus import JsonlCorpus
from explainers.store import StoreConfig, collect
cfg = StoreConfig(**{**__import__('json').loads(sys.argv[3]), "hooks": tuple(__import__('json').loads(sys.argv[3])["hooks"])})
m = load_model("ioi-2l", device="cpu")
collect(m, JsonlCorpus(sys.argv[1]), cfg, sys.argv[2], progress=False, on_shard=lambda i: time.sleep(0.4))
"""


def test_killed_collection_resumes_byte_identical(zoo_model, tmp_path):
    corpus_file = tmp_path / "ioi.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in ioi_texts(200)))
    cfg = small_cfg(n_tokens=1500, shard_batches=1)
    m = zoo_model("ioi-2l")
    ref = collect(m, JsonlCorpus(str(corpus_file)), cfg, tmp_path / "ref", progress=False)
    assert ref.n_shards >= 10
    victim_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(corpus_file), str(victim_dir),
                             json.dumps(cfg.to_dict())], env=env)
    manifest = victim_dir / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
            assert proc.poll() is None, "the collection subprocess ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 3 <= len(state["shards"]) < ref.n_shards
    resumed = collect(m, JsonlCorpus(str(corpus_file)), cfg, victim_dir, progress=False)
    assert resumed.n_rows == ref.n_rows
    want = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in victim_dir.iterdir() if not p.name.endswith(".tmp")) == want
    for name in want:
        assert (victim_dir / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_corpora_read_their_files(tmp_path):
    from explainers.corpus import FortunesCorpus, TextFileCorpus, corpus_from_spec

    (tmp_path / "a.txt").write_text("one line\nsecond line\n\nnext paragraph\n")
    assert list(TextFileCorpus(str(tmp_path / "a.txt"))) == ["one line\nsecond line", "next paragraph"]
    assert list(TextFileCorpus(str(tmp_path / "a.txt"), "line")) == ["one line", "second line", "next paragraph"]
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n{"tokens": [1, 2]}\n')
    assert next(iter(corpus_from_spec(str(tmp_path / "b.jsonl")))) == "hello"
    with pytest.raises(ValueError, match=r"b.jsonl:2: no field 'text'"):
        list(JsonlCorpus(str(tmp_path / "b.jsonl")))
    (tmp_path / "t.jsonl").write_text('{"tokens": [1, 2]}\n{"tokens": [3]}\n')
    assert list(JsonlCorpus(str(tmp_path / "t.jsonl"), "tokens")) == [(1, 2), (3,)]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: bad JSON"):
        list(JsonlCorpus(str(tmp_path / "c.jsonl")))
    fort = tmp_path / "fortunes"
    fort.mkdir()
    (fort / "wisdom").write_text("First fortune.\n\t-- Someone\n%\nSecond\nfortune.\n%\n")
    (fort / "wisdom.dat").write_bytes(b"\0\1")
    (fort / "ascii-art").write_text("  /\\_/\\\n%\n")
    c = FortunesCorpus(str(fort))
    assert list(c) == ["First fortune.\n\t-- Someone", "Second\nfortune."]
    assert c.describe()["files"] == ["wisdom"]
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        FortunesCorpus(str(tmp_path / "none"))
