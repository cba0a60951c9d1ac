"""SAEs on disk in SAELens' layout: ``cfg.json`` + ``sae_weights.safetensors``.

Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU
(and BatchTopK, which SAELens saves as JumpReLU), ``threshold [d_sae]`` — exactly the keys SAELens' strict
``load_state_dict`` expects, nothing else. ``cfg.json`` has SAELens' (6.x) config keys: ``architecture``
(``standard`` for relu-l1, ``topk``, ``jumprelu``), ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations`` (always ``none``: the training scale is folded into the
weights), ``reshape_activations`` (``hook_z`` for ``attn.hook_z`` SAEs), ``k`` and
``rescale_acts_by_decoder_norm`` (false) for topk, and ``metadata`` (``model_name``, ``hook_name``,
``context_size``, ``prepend_bos``, ``dataset_path``, ``sae_lens_version`` = the SAELens config schema followed).
What SAELens lacks goes under the extra key ``circuitexplain``: the architecture as trained (``batchtopk``
vs ``jumprelu``), the centring (``mean``: ``b_dec`` *is* the fixed data mean, which SAELens applies as an
ordinary ``b_dec``), the global BatchTopK threshold, and the training provenance.

:func:`load_sae` also reads SAEs written by SAELens (standard / topk / jumprelu, ``normalize_activations:
none``); anything else is refused with a one-line reason. Files are written atomically (tmp + ``os.replace``);
saving the same SAE twice gives identical bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from explainers.sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAELENS_SCHEMA = "6.0.0"
_ARCH_TO_SAELENS = {"relu-l1": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
_SAELENS_TO_ARCH = {"standard": "relu-l1", "topk": "topk", "jumprelu": "jumprelu"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def saelens_config(sae: SAE, *, metadata: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    c = sae.cfg
    meta = {"sae_lens_version": SAELENS_SCHEMA, "sae_lens_training_version": SAELENS_SCHEMA,
            "model_name": c.model, "hook_name": c.hook, "hook_head_index": None}
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        "architecture": _ARCH_TO_SAELENS[c.arch], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.hook.endswith("attn.hook_z") else "none", "metadata": meta,
    }
    if c.arch == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    ours = {"format_version": FORMAT_VERSION, "arch": c.arch, "centring": c.centring, "k": c.k}
    ours.update(extra or {})
    cfg["circuitexplain"] = ours
    return cfg


def save_sae(sae: SAE, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` into directory ``path`` in SAELens' layout (module docstring)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float() for k, v in sae.state_tensors().items()}
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, d / WEIGHTS_FILE)
    _atomic_write_text(d / CFG_FILE, json.dumps(saelens_config(sae, metadata=metadata, extra=extra), indent=1,
                                                sort_keys=True) + "\n")
    return d


def read_sae_config(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / CFG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{Path(path)}: no {CFG_FILE} (not an SAE directory in SAELens' layout)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` or by SAELens (module docstring)."""
    d = Path(path)
    raw = read_sae_config(d)
    where = d / CFG_FILE
    for key in ("architecture", "d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{where}: missing key {key!r}")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ValueError(f"{where}: normalize_activations={norm!r} is not supported (fold the scaling factor "
                         "into the weights first)")
    meta = raw.get("metadata") or {}
    ours = raw.get("circuitexplain") or {}
    sl_arch = raw["architecture"]
    if ours:
        arch, centring = ours["arch"], ours["centring"]
        if _ARCH_TO_SAELENS.get(arch) != sl_arch:
            raise ValueError(f"{where}: architecture {sl_arch!r} disagrees with circuitexplain.arch {arch!r}")
    else:
        if sl_arch not in _SAELENS_TO_ARCH:
            raise ValueError(f"{where}: SAELens architecture {sl_arch!r} is not supported "
                             f"(supported: {', '.join(_SAELENS_TO_ARCH)})")
        arch = _SAELENS_TO_ARCH[sl_arch]
        centring = "learned" if raw.get("apply_b_dec_to_input", True) else "none"
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(f"{where}: topk with rescale_acts_by_decoder_norm is not supported")
    cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), arch=arch, centring=centring,
                    k=int(raw["k"]) if arch == "topk" else None, hook=str(meta.get("hook_name") or ""),
                    model=str(meta.get("model_name") or ""),
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)))
    wf = d / WEIGHTS_FILE
    if not wf.is_file():
        raise FileNotFoundError(f"{d}: no {WEIGHTS_FILE}")
    state = load_file(str(wf))
    sae = SAE(cfg)
    expected = set(sae.state_dict())
    if set(state) != expected:
        raise ValueError(f"{wf}: tensors {sorted(state)} do not match a {arch} SAE ({sorted(expected)})")
    for k, v in state.items():
        want = tuple(sae.state_dict()[k].shape)
        if tuple(v.shape) != want:
            raise ValueError(f"{wf}: {k} has shape {tuple(v.shape)}, expected {want}")
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    return sae.to(device).eval()
