"""tracr-compiled transformers as TransformerLens bridges: models whose circuits are known by construction.

tracr (Lindner et al. 2023, "Tracr: Compiled Transformers as a Laboratory for Interpretability") compiles a
RASP program (Weiss et al. 2021) into transformer weights in which every residual dimension has a label
(``tokens:a``, ``indices:3``, ``length_5:2``, ``one``, ...). This module

1. compiles a program from :data:`TRACR_PROGRAMS` with ``compile_rasp_to_model(..., max_seq_len=5,
   compiler_bos="BOS")`` (needs the optional extra ``circuitexplain[tracr]``: ``pip install tracr-pypi``)
   and caches the weights as ``.npz`` + ``.json`` under ``$CIRCUITEXPLAIN_CACHE/tracr`` (default
   ``~/.cache/circuitexplain/tracr``), so later loads need neither JAX nor a recompile;
2. loads them into ``TransformerBridge.boot_native``: no normalisation, ReLU MLPs, bidirectional attention
   scaled by ``sqrt(d_head)`` (tracr's ``key_size``), zero biases, and an unembedding rebuilt from the residual
   labels so that its columns are the bridge's token ids (see :func:`bridge_vocab`);
3. checks such a bridge against tracr itself on every input (:func:`verify_against_tracr`).

Residual labels carry RASP's global id counter (``map_9``), so two compilations in different processes
may name (and order) dims differently; everything here reads labels from the compilation it uses.

Vocabulary: the bridge's token ids are tracr's input encoding (``BOS``, the program's vocabulary,
``compiler_pad`` in tracr's order), followed by output-only tokens: for a categorical program the output
values that are not input tokens; for a numerical program one readout token named after the program
(``frac_prevs``) whose logit is the program's numerical output. Every other logit is exactly 0, so
``logit(readout) - logit(compiler_pad)`` is the program's value. Embedding rows of output-only tokens are 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

BOS = "BOS"
PAD = "compiler_pad"
FORMAT_VERSION = 1
MODEL_PREFIX = "tracr-"


@dataclass(frozen=True)
class TracrProgram:
    """A RASP program from ``tracr.compiler.lib`` with the vocabulary it is compiled for.

    Attributes:
        name: registry key (``reverse``, ``frac_prevs``).
        builder: ``"module:function"`` path of the program builder; see :func:`_build_program`.
        vocab: input vocabulary (must not contain ``BOS`` / ``compiler_pad``).
        max_seq_len: longest input (BOS not counted).
        description: one line for ``--help`` and reports.
    """

    name: str
    builder: str
    vocab: tuple[str, ...]
    max_seq_len: int = 5
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "builder": self.builder, "vocab": list(self.vocab),
                "max_seq_len": self.max_seq_len, "description": self.description}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TracrProgram:
        return cls(name=d["name"], builder=d["builder"], vocab=tuple(d["vocab"]),
                   max_seq_len=int(d.get("max_seq_len", 5)), description=d.get("description", ""))


TRACR_PROGRAMS: dict[str, TracrProgram] = {
    "reverse": TracrProgram("reverse", "make_reverse(tokens)", ("a", "b", "c"), 5,
                            "reverse the input: length (selector width) -> opp_idx -> aggregate tokens"),
    "frac_prevs": TracrProgram("frac_prevs", 'make_frac_prevs(tokens == "x")', ("x", "y"), 5,
                               "fraction of the tokens so far that are 'x' (numerical output)"),
}


@dataclass(frozen=True)
class CompiledTracr:
    """tracr's compiled weights as numpy arrays plus the labels needed to rebuild and read them.

    Attributes:
        program: the compiled program.
        residual_labels: one label per residual dimension (``tokens:a``, ``one``, ...).
        input_tokens: tracr's input encoding, token id -> token (``BOS`` first).
        output_label: the sink SOp's label (``reverse_1``); residual dims ``{output_label}:{value}`` hold a
            categorical output, the dim ``{output_label}`` a numerical one.
        output_values: categorical output values in tracr's output encoding order; ``()`` if numerical.
        categorical: whether the output is categorical (argmax) or numerical (a value).
        n_layers, n_heads, d_head, d_mlp: tracr's model config.
        weights: ``token_embed [V_in, D]``, ``pos_embed [max_seq_len + 1, D]`` and per layer ``L``:
            ``L.query/key/value [D, H*d_head]``, ``L.linear [H*d_head, D]``, ``L.linear_1 [D, d_mlp]``,
            ``L.linear_2 [d_mlp, D]`` and their biases ``L.<name>.b`` (all zero in tracr).
    """

    program: TracrProgram
    residual_labels: tuple[str, ...]
    input_tokens: tuple[str, ...]
    output_label: str
    output_values: tuple[str, ...]
    categorical: bool
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    weights: dict[str, np.ndarray] = field(repr=False, compare=False)

    @property
    def d_model(self) -> int:
        return len(self.residual_labels)

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "program": self.program.to_dict(),
                "residual_labels": list(self.residual_labels), "input_tokens": list(self.input_tokens),
                "output_label": self.output_label, "output_values": list(self.output_values),
                "categorical": self.categorical, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "d_head": self.d_head, "d_mlp": self.d_mlp}


def get_program(name: str) -> TracrProgram:
    """The program called ``name`` or ``tracr-name``."""
    key = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name
    if key not in TRACR_PROGRAMS:
        raise ValueError(f"unknown tracr program {name!r}; choose one of "
                         f"{sorted(MODEL_PREFIX + k for k in TRACR_PROGRAMS)}")
    return TRACR_PROGRAMS[key]


def is_tracr_name(name: str) -> bool:
    return name.startswith(MODEL_PREFIX) and name[len(MODEL_PREFIX):] in TRACR_PROGRAMS


def cache_dir() -> Path:
    root = os.environ.get("CIRCUITEXPLAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "circuitexplain")
    return Path(root) / "tracr"


def _import_tracr() -> Any:
    try:
        from tracr.compiler import compiling, lib
        from tracr.rasp import rasp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("tracr is not installed: pip install 'circuitexplain[tracr]' (tracr-pypi, pulls JAX)") from e
    return compiling, lib, rasp


def _build_program(program: TracrProgram) -> Any:
    _, lib, rasp = _import_tracr()
    if program.name == "reverse":
        return lib.make_reverse(rasp.tokens)
    if program.name == "frac_prevs":
        return lib.make_frac_prevs(rasp.tokens == "x")
    raise ValueError(f"tracr program {program.name!r} has no builder")


def compile_assembled(program: TracrProgram) -> tuple[Any, str]:
    """tracr's ``AssembledTransformerModel`` for ``program`` and the label of its output SOp (compiles;
    needs tracr)."""
    compiling, _, _ = _import_tracr()
    expr = _build_program(program)
    assembled = compiling.compile_rasp_to_model(expr, vocab=set(program.vocab), max_seq_len=program.max_seq_len,
                                                compiler_bos=BOS)
    return assembled, str(expr.label)


def _from_assembled(program: TracrProgram, assembled: Any, output_label: str) -> CompiledTracr:
    cfg = assembled.model_config
    p = {k: {kk: np.asarray(vv, dtype=np.float32) for kk, vv in v.items()} for k, v in assembled.params.items()}
    w: dict[str, np.ndarray] = {"token_embed": p["token_embed"]["embeddings"], "pos_embed": p["pos_embed"]["embeddings"]}
    for layer in range(cfg.num_layers):
        for part in ("query", "key", "value", "linear"):
            src = p[f"transformer/layer_{layer}/attn/{part}"]
            w[f"{layer}.{part}"], w[f"{layer}.{part}.b"] = src["w"], src["b"]
        for part in ("linear_1", "linear_2"):
            src = p[f"transformer/layer_{layer}/mlp/{part}"]
            w[f"{layer}.{part}"], w[f"{layer}.{part}.b"] = src["w"], src["b"]
    enc = assembled.input_encoder.encoding_map
    input_tokens = tuple(str(t) for t, _ in sorted(enc.items(), key=lambda kv: kv[1]))
    categorical = hasattr(assembled.output_encoder, "encoding_map")
    labels = tuple(assembled.residual_labels)
    output_values: tuple[str, ...] = ()
    if categorical:
        out = assembled.output_encoder.encoding_map
        output_values = tuple(str(t) for t, _ in sorted(out.items(), key=lambda kv: kv[1]))
        needed = [f"{output_label}:{v}" for v in output_values]
    else:
        needed = [output_label]
    if any(d not in labels for d in needed):
        raise ValueError(f"tracr program {program.name!r}: output dims {needed} missing from the residual labels")
    return CompiledTracr(program=program, residual_labels=labels, input_tokens=input_tokens,
                         output_label=output_label, output_values=output_values, categorical=categorical,
                         n_layers=cfg.num_layers, n_heads=cfg.num_heads, d_head=cfg.key_size,
                         d_mlp=cfg.mlp_hidden_size, weights=w)


def _tracr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tracr-pypi")
    except PackageNotFoundError:
        return "unknown"


def _cache_key(program: TracrProgram) -> str:
    blob = json.dumps({"program": program.to_dict(), "tracr": _tracr_version(), "format": FORMAT_VERSION},
                      sort_keys=True)
    return f"{program.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _cached_files(program: TracrProgram, directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{program.name}-*.json"), key=lambda p: p.stat().st_mtime)


def _load_cached(program: TracrProgram, meta_path: Path) -> CompiledTracr | None:
    npz_path = meta_path.with_suffix(".npz")
    if not (meta_path.exists() and npz_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION or meta.get("program") != program.to_dict():
        return None
    with np.load(npz_path) as z:
        weights = {k: z[k] for k in z.files}
    return CompiledTracr(program=program, residual_labels=tuple(meta["residual_labels"]),
                         input_tokens=tuple(meta["input_tokens"]), output_label=meta["output_label"],
                         output_values=tuple(meta["output_values"]), categorical=bool(meta["categorical"]),
                         n_layers=int(meta["n_layers"]), n_heads=int(meta["n_heads"]), d_head=int(meta["d_head"]),
                         d_mlp=int(meta["d_mlp"]), weights=weights)


def compile_tracr(name: str, *, cache: Path | str | None = None, refresh: bool = False) -> CompiledTracr:
    """The compiled weights of program ``name`` (``reverse`` or ``tracr-reverse``), from the disk cache when
    present, else compiled with tracr (2-3 s) and written to the cache.

    Without tracr installed a cached compilation is still used (any tracr version); with it, the cache key
    includes the tracr version so an upgrade recompiles.
    """
    program = get_program(name)
    directory = Path(cache) if cache is not None else cache_dir()
    key = _cache_key(program)
    candidates = [directory / f"{key}.json"]
    if _tracr_version() == "unknown":  # no tracr: any cached compilation of this program will do
        candidates += _cached_files(program, directory)[::-1]
    for meta_path in ([] if refresh else candidates):
        loaded = _load_cached(program, meta_path)
        if loaded is not None:
            return loaded
    _import_tracr()  # raises the install hint when tracr is missing
    meta_path, npz_path = directory / f"{key}.json", directory / f"{key}.npz"
    log.info("compiling tracr program %s", program.name)
    compiled = _from_assembled(program, *compile_assembled(program))
    directory.mkdir(parents=True, exist_ok=True)
    tmp = npz_path.with_name(npz_path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **compiled.weights)
    os.replace(tmp, npz_path)
    tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(compiled.meta(), indent=1))
    os.replace(tmp_meta, meta_path)
    return compiled


def bridge_vocab(compiled: CompiledTracr) -> tuple[str, ...]:
    """The bridge's tokens: tracr's input tokens, then output-only tokens (see the module docstring)."""
    extra = [v for v in compiled.output_values if v not in compiled.input_tokens]
    if not compiled.categorical:
        extra.append(compiled.program.name)
    return compiled.input_tokens + tuple(extra)


def readout_token(compiled: CompiledTracr) -> str | None:
    """The token whose logit is a numerical program's output (``None`` for categorical programs)."""
    return None if compiled.categorical else compiled.program.name


def unembedding(compiled: CompiledTracr) -> np.ndarray:
    """``W_U [D, V]`` rebuilt from the residual labels: the output-space dims projected onto token columns."""
    vocab = {t: i for i, t in enumerate(bridge_vocab(compiled))}
    row = {lab: i for i, lab in enumerate(compiled.residual_labels)}
    w_u = np.zeros((compiled.d_model, len(vocab)), dtype=np.float32)
    if compiled.categorical:
        for v in compiled.output_values:
            w_u[row[f"{compiled.output_label}:{v}"], vocab[v]] = 1.0
    else:
        w_u[row[compiled.output_label], vocab[compiled.program.name]] = 1.0
    return w_u


def tracr_tokenizer(compiled: CompiledTracr, directory: Path | str | None = None) -> Any:
    """A whitespace word-level HF tokenizer over :func:`bridge_vocab` (BOS ``BOS``, pad/unk ``compiler_pad``),
    saved to and reloaded from disk (TransformerLens needs an on-disk tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(bridge_vocab(compiled))}
    path = Path(directory) if directory is not None else cache_dir() / f"tokenizer-{_cache_key(compiled.program)}"
    if not (path / "tokenizer.json").exists():
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, unk_token=PAD)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fast.save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)  # atomic; fails if another process got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(path))


def build_bridge(compiled: CompiledTracr, device: str | torch.device | None = None) -> Any:
    """A ``TransformerBridge.boot_native`` model carrying ``compiled``'s weights (float32).

    The bridge gets ``model.tracr = compiled`` for the reference-circuit derivation and
    ``model.circuitexplain_name`` (``tracr-reverse``) for provenance.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    vocab = bridge_vocab(compiled)
    n_in = len(compiled.input_tokens)
    cfg = TransformerBridgeConfig(
        n_layers=compiled.n_layers, d_model=compiled.d_model, d_head=compiled.d_head, n_heads=compiled.n_heads,
        d_mlp=compiled.d_mlp, d_vocab=len(vocab), d_vocab_out=len(vocab), n_ctx=compiled.program.max_seq_len + 1,
        act_fn="relu", normalization_type=None, attention_dir="bidirectional", positional_embedding_type="standard",
        model_name=MODEL_PREFIX + compiled.program.name, init_weights=False)
    model = TransformerBridge.boot_native(cfg, tokenizer=tracr_tokenizer(compiled),
                                          model_name=MODEL_PREFIX + compiled.program.name)
    w = compiled.weights
    embed = np.zeros((len(vocab), compiled.d_model), dtype=np.float32)
    embed[:n_in] = w["token_embed"]
    sd: dict[str, np.ndarray] = {"embed.weight": embed, "pos_embed.weight": w["pos_embed"],
                                 "unembed.weight": unembedding(compiled).T,
                                 "unembed.bias": np.zeros(len(vocab), dtype=np.float32)}
    for layer in range(compiled.n_layers):
        for tl, tr in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "linear")):
            sd[f"blocks.{layer}.attn.{tl}.weight"] = w[f"{layer}.{tr}"].T
            sd[f"blocks.{layer}.attn.{tl}.bias"] = w[f"{layer}.{tr}.b"]
        for tl, tr in (("in", "linear_1"), ("out", "linear_2")):
            sd[f"blocks.{layer}.mlp.{tl}.weight"] = w[f"{layer}.{tr}"].T
            sd[f"blocks.{layer}.mlp.{tl}.bias"] = w[f"{layer}.{tr}.b"]
    state = model.state_dict()
    missing = sorted(set(state) - set(sd))
    if missing:
        raise ValueError(f"tracr {compiled.program.name}: bridge parameters without tracr weights: {missing}")
    for k, v in sd.items():
        if tuple(state[k].shape) != v.shape:
            raise ValueError(f"tracr {compiled.program.name}: {k} has shape {tuple(state[k].shape)}, "
                             f"tracr gives {v.shape}")
    model.load_state_dict({k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in sd.items()})
    model.eval()
    if device is not None:
        model.to(device)
    model.tracr = compiled
    model.circuitexplain_name = MODEL_PREFIX + compiled.program.name  # the name circuits.discover records
    return model


def load_tracr_model(name: str, device: str | torch.device | None = None) -> Any:
    """The bridge for ``tracr-reverse`` / ``tracr-frac_prevs`` (compiled or loaded from the cache)."""
    return build_bridge(compile_tracr(name), device=device)


def all_inputs(program: TracrProgram, lengths: range | None = None) -> list[list[str]]:
    """Every input sequence over the program's vocabulary with a length in ``lengths`` (default 1..max)."""
    import itertools

    lengths = lengths or range(1, program.max_seq_len + 1)
    return [list(seq) for n in lengths for seq in itertools.product(sorted(program.vocab), repeat=n)]


def verify_against_tracr(name: str, assembled: tuple[Any, str] | None = None,
                         device: str | torch.device | None = None) -> dict[str, float]:
    """Compile program ``name`` with tracr, load it into a bridge, run both on every input of length
    1..max_seq_len and compare. Needs tracr.

    ``assembled``: a ``compile_assembled`` result to reuse. Returns ``{"inputs": n, "max_residual_diff",
    "max_output_diff", "mismatches"}``: the largest absolute difference of any residual stream (after every
    attention and MLP sublayer) and of the outputs (tracr's unembedding of its final residual onto our
    token columns), and the number of token positions whose decoded output differs (argmax of a categorical
    program, value of a numerical one, tolerance 1e-5).
    """
    import jax
    import jax.numpy as jnp

    program = get_program(name)
    assembled, label = assembled if assembled is not None else compile_assembled(program)
    compiled = _from_assembled(program, assembled, label)
    model = build_bridge(compiled, device=device)
    forward = jax.jit(assembled.forward)
    enc = assembled.input_encoder.encoding_map
    vocab = {t: i for i, t in enumerate(bridge_vocab(compiled))}
    w_u = torch.from_numpy(unembedding(compiled))
    stats = {"inputs": 0.0, "max_residual_diff": 0.0, "max_output_diff": 0.0, "mismatches": 0.0}
    dev = next(model.parameters()).device

    def np32(x: Any) -> torch.Tensor:
        return torch.tensor(np.asarray(x, dtype=np.float32))

    for n in range(1, program.max_seq_len + 1):
        seqs = all_inputs(program, range(n, n + 1))
        ref = forward(assembled.params, jnp.array([[enc[BOS]] + [enc[t] for t in s] for s in seqs]))
        toks = torch.tensor([[vocab[BOS]] + [vocab[t] for t in s] for s in seqs], device=dev)
        with torch.no_grad():
            logits, cache = model.run_with_cache(toks)
        logits = logits.cpu()
        ours = []
        for layer in range(compiled.n_layers):
            ours += [cache[f"blocks.{layer}.hook_resid_mid"], cache[f"blocks.{layer}.hook_resid_post"]]
        for mine, theirs in zip(ours, ref.transformer_output.residuals, strict=True):
            stats["max_residual_diff"] = max(stats["max_residual_diff"], float((mine.cpu() - np32(theirs)).abs().max()))
        expected = np32(ref.transformer_output.output) @ w_u
        stats["max_output_diff"] = max(stats["max_output_diff"], float((logits - expected).abs().max()))
        theirs = np.asarray(ref.unembedded_output)[:, 1:]  # BOS position excluded, as tracr's decoder does
        if compiled.categorical:
            cols = torch.tensor([vocab[v] for v in compiled.output_values])
            mine_idx = logits[:, 1:][..., cols].argmax(-1).numpy()  # index in tracr's output encoding
            stats["mismatches"] += float((mine_idx != theirs).sum())
        else:
            mine_val = logits[:, 1:, vocab[program.name]].numpy()
            stats["mismatches"] += float((np.abs(mine_val - theirs) > 1e-5).sum())
        stats["inputs"] += len(seqs)
    return stats
