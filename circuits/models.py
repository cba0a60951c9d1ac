"""Load a language model as a TransformerLens 4 ``TransformerBridge``.

:func:`load_model` accepts three kinds of names, tried in this order:

1. a zoo name (``ioi-2l``, ``attn2l-induction``, ...; see ``circuitexplain zoo list``): the checkpoint
   shipped in ``circuits/zoo/checkpoints/NAME/``, which loads offline;
2. a local directory in HuggingFace format (``config.json`` with ``architectures``, weights, tokenizer);
3. a HuggingFace hub name (``gpt2``, ``EleutherAI/pythia-70m``, ...), loaded through
   ``TransformerBridge.boot_transformers`` (needs the hub or a filled local cache when ``HF_HUB_OFFLINE=1``).

Nothing is cached globally: every call builds a fresh bridge (tests cache through a fixture).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _zoo_names() -> list[str]:
    from circuits.zoo import RECIPES

    return sorted(RECIPES)


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, location)`` with kind ``zoo`` | ``local`` | ``hub``; a one-line ``ValueError`` if none fits."""
    from circuits.zoo import RECIPES, checkpoint_dir

    name = str(name_or_path)
    if name in RECIPES:
        d = checkpoint_dir(name)
        if not (d / "config.json").is_file():
            raise ValueError(f"zoo model {name!r} has no checkpoint in {d}; run `circuitexplain zoo train {name}`")
        return "zoo", str(d)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p}: not a HuggingFace model directory (no config.json)")
        return "local", str(p)
    if name.startswith((".", "/", "~")) or not _HUB_NAME.match(name):
        raise ValueError(f"unknown model {name!r}: not a zoo model ({', '.join(_zoo_names())}) "
                         "and not an existing local model directory")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise ValueError(f"unknown model {name!r}: not a zoo model ({', '.join(_zoo_names())}), not a local "
                             "directory, and not in the HuggingFace cache (HF_HUB_OFFLINE=1 forbids downloading)")
    return "hub", name


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _config(location: str) -> dict[str, Any]:
    f = Path(location) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def enable_per_head_hooks(bridge: Any) -> dict[str, bool]:
    """Switch on ``hook_result`` (per-head attention outputs) and ``hook_q/k/v_input`` where supported.

    Bridges without attention (Mamba, RWKV) or built by ``boot_native`` raise ``NotImplementedError``
    (or have no such switch); that is logged and reported as ``False``.
    """
    enabled = {}
    for switch in ("set_use_attn_result", "set_use_split_qkv_input"):
        fn = getattr(bridge, switch, None)
        try:
            if fn is None:
                raise NotImplementedError(f"{type(bridge).__name__} has no {switch}")
            fn(True)
            enabled[switch] = True
        except (NotImplementedError, AttributeError, ValueError, RuntimeError) as e:
            logger.info("%s not supported on this model: %s", switch, e)
            enabled[switch] = False
    return enabled


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None, *,
               n_devices: int = 1, dtype: torch.dtype | str | None = None) -> Any:
    """Load a zoo model, a local HF-format directory or a hub model as a ``TransformerBridge``.

    Args:
        name_or_path: zoo name, local directory, or hub name (see the module docstring).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"`` ...; default ``"cuda"`` when available, else ``"cpu"``.
        n_devices: split the model across this many CUDA devices. With ``n_devices > 1`` the bridge
            loads through HuggingFace/accelerate with ``device_map="balanced"`` and a per-GPU memory
            budget (TransformerLens' ``n_devices``); ``device`` must then be left ``None``. Layers live on
            different GPUs and activations move between them inside the forward pass; hooks still work.
            Recurrent (Mamba) models cannot be split.
        dtype: ``torch.float32`` (default), ``torch.float16``, ``torch.bfloat16`` or their names.

    Returns:
        The bridge in eval mode, with per-head hooks (``blocks.L.attn.hook_result``,
        ``blocks.L.hook_q_input`` ...) enabled where the architecture supports them. For attention-only
        zoo models (``circuitexplain_attn_only`` in config.json; their MLPs output exactly zero)
        ``bridge.cfg.attn_only`` is set to ``True``.

    Raises:
        ValueError: one line naming the problem (unknown name, with the zoo names listed; missing
            checkpoint; bad dtype; ``device`` given together with ``n_devices > 1``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    kind, location = resolve(name_or_path)
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype)}
    if n_devices > 1:
        if device is not None:
            raise ValueError("give either device or n_devices > 1 (the model is then spread over cuda:0..n-1)")
        kwargs["n_devices"] = n_devices
    else:
        kwargs["device"] = str(device) if device is not None else default_device()
    logger.info("loading %s model %s (%s)", kind, name_or_path, kwargs)
    try:
        with _quiet_weight_loading(kind != "hub"):
            bridge = TransformerBridge.boot_transformers(location, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {str(name_or_path)!r} ({first}); zoo models are: "
                         f"{', '.join(_zoo_names())}") from None
    bridge.eval()
    enable_per_head_hooks(bridge)
    if _config(location).get("circuitexplain_attn_only"):
        bridge.cfg.attn_only = True
    return bridge


@contextlib.contextmanager
def _quiet_weight_loading(quiet: bool) -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bar for zoo and local checkpoints (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a zoo model, local directory or hub model, loaded from disk (or the hub cache)."""
    from transformers import AutoTokenizer

    _, location = resolve(name_or_path)
    return AutoTokenizer.from_pretrained(location)


__all__ = ["load_model", "load_tokenizer", "resolve", "enable_per_head_hooks", "default_device"]
