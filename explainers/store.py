"""The activation store: activations at some hooks over a token budget, sharded on disk, streamed back shuffled.

**Collection** (:func:`collect`). Documents from a corpus (:mod:`explainers.corpus`) are tokenized with the
model's tokenizer and cut into contexts of at most ``seq_len`` tokens, each starting with BOS (when
``prepend_bos``). Contexts are batched (``batch_size`` per forward, right-padded: the models are causal, so padding
after a token cannot change it), the forward pass stops once the last needed hook has fired
(:func:`explainers.capture.capture`), and every real token's activation becomes one row; BOS and padding are
excluded (``exclude_bos``). Collection stops at exactly ``n_tokens`` rows. A shard holds ``shard_batches`` whole
batches, so a resumed run forms the same batches as an uninterrupted one.

**On disk.** ``DIR/manifest.json`` (``settings``: model, hooks with their shapes, dtype, corpus description,
tokenizer facts, the collection settings; ``shards``: file, rows, contexts, first row, first context; ``complete``;
no timestamps) and ``DIR/shard-NNNNN.safetensors`` with, per shard, ``acts.<hook>`` ``[rows, d]`` (``hook_z``
flattened to ``H * d_head``) and the token positions: ``row_context``, ``row_position`` (in the context, 0 = BOS),
``row_document``, ``row_doc_position`` (token offset in the document), and the contexts' tokens
``context_tokens [C, L]`` (-1 = padding), ``context_index``, ``context_document``, ``context_start``.
Each shard is written to a temporary file and moved into place, then the manifest is rewritten the same way, so
a killed collection resumes at the last complete shard and ends byte-identical to an uninterrupted run.

**Streaming** (:meth:`ActivationStore.batches`): seeded per ``(seed, epoch)``; shards are visited in a random order
``buffer_shards`` at a time, their rows shuffled together (leftovers carried to the next group), so each row comes
exactly once per epoch. ``with_rows=True`` also yields the rows' global indices (for exemplars:
:meth:`ActivationStore.context`).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from explainers.capture import capture, check_hooks
from explainers.corpus import Corpus

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "circuitexplain-activation-store"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StoreConfig:
    """What to collect. ``n_tokens`` counts stored rows (BOS and padding excluded)."""

    model: str
    hooks: tuple[str, ...]
    n_tokens: int
    seq_len: int = 128
    batch_size: int = 16           # contexts per forward pass
    shard_batches: int = 8         # batches per shard
    dtype: str = "float32"
    prepend_bos: bool = True
    exclude_bos: bool = True

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ValueError("StoreConfig: no hooks given")
        if self.n_tokens < 1 or self.seq_len < 2 or self.batch_size < 1 or self.shard_batches < 1:
            raise ValueError(f"StoreConfig: need n_tokens >= 1, seq_len >= 2, batch_size >= 1, shard_batches >= 1; "
                             f"got {self.n_tokens}, {self.seq_len}, {self.batch_size}, {self.shard_batches}")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreConfig: dtype {self.dtype!r} unknown; one of {sorted(DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = list(self.hooks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names}, "hooks": tuple(d["hooks"])})


@dataclass(frozen=True)
class Context:
    index: int
    document: int
    start: int                 # offset in the document's tokens of the first non-BOS token
    tokens: tuple[int, ...]    # with BOS first when prepend_bos


def _tokenize(tokenizer: Any, doc: Any, where: str, vocab: int) -> list[int]:
    if isinstance(doc, str):
        ids = list(tokenizer(doc, add_special_tokens=False)["input_ids"])
    else:
        ids = [int(t) for t in doc]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} outside the vocabulary (0..{vocab - 1})")
    return ids


def iter_contexts(corpus: Corpus, tokenizer: Any, cfg: StoreConfig, vocab: int) -> Iterator[Context]:
    """The corpus cut into contexts (module docstring), in a fixed order."""
    bos: list[int] = []
    if cfg.prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token; collect with prepend_bos=False")
        bos = [int(tokenizer.bos_token_id)]
    body = cfg.seq_len - len(bos)
    k = 0
    for d, doc in enumerate(corpus):
        ids = _tokenize(tokenizer, doc, f"corpus {corpus.name} document {d}", vocab)
        for start in range(0, len(ids), body):
            yield Context(k, d, start, tuple(bos + ids[start:start + body]))
            k += 1


def _settings(model: Any, corpus: Corpus, cfg: StoreConfig, shapes: dict[str, list[int]]) -> dict[str, Any]:
    tok = model.tokenizer
    return {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "corpus": corpus.describe(),
            "hook_shapes": shapes, "d": {h: int(np.prod(s)) for h, s in shapes.items()},
            "tokenizer": {"bos": tok.bos_token_id, "pad": tok.pad_token_id, "eos": tok.eos_token_id,
                          "vocab": int(model.cfg.d_vocab)}}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}{k}"
            diff = _first_difference(a[k], b[k], f"{where}{k}.")
            if diff:
                return diff
        return None
    return None if a == b else where.rstrip(".")


def _hook_shapes(model: Any, hooks: Sequence[str]) -> dict[str, list[int]]:
    """Per-row shape of each hook's activations, from a two-token forward pass."""
    dev = next(model.parameters()).device
    toks = torch.zeros(1, 2, dtype=torch.long, device=dev)
    acts = capture(model, hooks, toks)
    return {h: list(acts[h].shape[2:]) for h in hooks}


@torch.no_grad()
def collect(model: Any, corpus: Corpus, cfg: StoreConfig, out_dir: str | os.PathLike, *, progress: bool = True,
            resume: bool = True, on_shard: Callable[[int], None] | None = None) -> ActivationStore:
    """Collect activations into ``out_dir`` (module docstring); returns the finished store.

    An existing manifest with the same settings is resumed (``resume=False``: refused); one with other settings
    is a one-line ``ValueError`` naming the first differing setting. ``on_shard(i)`` is called after shard ``i``
    is committed.
    """
    from tqdm.auto import tqdm

    check_hooks(model, cfg.hooks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(model, corpus, cfg, _hook_shapes(model, cfg.hooks))
    mpath = out / MANIFEST
    shards: list[dict[str, Any]] = []
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        diff = _first_difference(old.get("settings"), settings)
        if diff is not None:
            raise ValueError(f"{out}: a store with other settings is there ({diff} differs); use another directory")
        if old.get("complete"):
            return ActivationStore(out)
        if not resume:
            raise ValueError(f"{out}: an unfinished collection is there; resume it or use another directory")
        shards = old["shards"]
        log.info("resuming collection in %s after %d shards", out, len(shards))
    dtype = DTYPES[cfg.dtype]
    dev = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    rows_done = sum(s["rows"] for s in shards)
    skip = sum(s["contexts_read"] for s in shards)
    contexts = iter_contexts(corpus, model.tokenizer, cfg, settings["tokenizer"]["vocab"])
    for _ in range(skip):
        next(contexts)
    first_row = 1 if (cfg.prepend_bos and cfg.exclude_bos) else 0
    bar = tqdm(total=cfg.n_tokens, initial=rows_done, unit="tok", desc="collect", disable=not progress)
    try:
        while rows_done < cfg.n_tokens:
            batch_ctx: list[Context] = []
            rows: dict[str, list[Tensor]] = {h: [] for h in cfg.hooks}
            meta: dict[str, list[int]] = {k: [] for k in ("ctx", "pos", "doc", "dpos")}
            budget = cfg.n_tokens - rows_done
            n_rows = pulled = 0
            for _ in range(cfg.shard_batches):
                if n_rows >= budget:
                    break
                group = []
                for c in contexts:
                    group.append(c)
                    if len(group) == cfg.batch_size:
                        break
                if not group:
                    break
                pulled += len(group)
                L = max(len(c.tokens) for c in group)
                toks = torch.full((len(group), L), pad, dtype=torch.long)
                for i, c in enumerate(group):
                    toks[i, :len(c.tokens)] = torch.tensor(c.tokens)
                acts = capture(model, cfg.hooks, toks.to(dev))
                bi, pi = [], []
                for i, c in enumerate(group):
                    n_before = n_rows
                    for p in range(first_row, len(c.tokens)):
                        if n_rows >= budget:
                            break
                        bi.append(i)
                        pi.append(p)
                        meta["ctx"].append(c.index)
                        meta["pos"].append(p)
                        meta["doc"].append(c.document)
                        meta["dpos"].append(c.start + p - (1 if cfg.prepend_bos else 0))
                        n_rows += 1
                    if n_rows > n_before:
                        batch_ctx.append(c)
                b_idx, p_idx = torch.tensor(bi, dtype=torch.long), torch.tensor(pi, dtype=torch.long)
                for h in cfg.hooks:
                    a = acts[h][b_idx.to(dev), p_idx.to(dev)]
                    rows[h].append(a.reshape(len(bi), -1).to("cpu", dtype))
                bar.update(len(bi))
            if not batch_ctx:
                break
            i = len(shards)
            name = f"shard-{i:05d}.safetensors"
            Lc = max(len(c.tokens) for c in batch_ctx)
            ctok = torch.full((len(batch_ctx), Lc), -1, dtype=torch.int32)
            for j, c in enumerate(batch_ctx):
                ctok[j, :len(c.tokens)] = torch.tensor(c.tokens, dtype=torch.int32)
            tensors = {f"acts.{h}": torch.cat(rows[h]).contiguous() for h in cfg.hooks}
            tensors.update({
                "row_context": torch.tensor(meta["ctx"], dtype=torch.int64),
                "row_position": torch.tensor(meta["pos"], dtype=torch.int32),
                "row_document": torch.tensor(meta["doc"], dtype=torch.int64),
                "row_doc_position": torch.tensor(meta["dpos"], dtype=torch.int64),
                "context_tokens": ctok,
                "context_index": torch.tensor([c.index for c in batch_ctx], dtype=torch.int64),
                "context_document": torch.tensor([c.document for c in batch_ctx], dtype=torch.int64),
                "context_start": torch.tensor([c.start for c in batch_ctx], dtype=torch.int64),
            })
            tmp = out / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, out / name)
            shards.append({"file": name, "rows": n_rows, "contexts": len(batch_ctx), "contexts_read": pulled,
                           "first_row": rows_done, "first_context": batch_ctx[0].index})
            rows_done += n_rows
            _write_json(mpath, {"settings": settings, "shards": shards, "complete": False, "n_rows": rows_done})
            if on_shard is not None:
                on_shard(i)
    finally:
        bar.close()
    if rows_done < cfg.n_tokens:
        log.warning("corpus %s ran out after %d of %d tokens", corpus.name, rows_done, cfg.n_tokens)
    _write_json(mpath, {"settings": settings, "shards": shards, "complete": True, "n_rows": rows_done})
    return ActivationStore(out)


class ActivationStore:
    """A finished collection, read back (module docstring). ``cache_bytes`` keeps recently read shard tensors in
    memory (least recently used dropped first), so epochs after the first need no disk reads."""

    def __init__(self, path: str | os.PathLike, *, cache_bytes: int = 2 << 30) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST} (not an activation store)")
        self.manifest = json.loads(mpath.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.path}: the collection is unfinished; rerun it to resume")
        s = self.manifest["settings"]
        if s.get("format") != FORMAT:
            raise ValueError(f"{self.path}: {MANIFEST} is not an activation-store manifest")
        self.config = StoreConfig.from_dict(s["config"])
        self.hooks = tuple(self.config.hooks)
        self.shards = self.manifest["shards"]
        self.n_rows = int(self.manifest["n_rows"])
        self._first_rows = [sh["first_row"] for sh in self.shards]
        self._cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def d(self, hook: str) -> int:
        self._check_hook(hook)
        return int(self.manifest["settings"]["d"][hook])

    def _check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise ValueError(f"{self.path}: no activations for hook {hook!r} (stored: {', '.join(self.hooks)})")

    def tensor(self, shard: int, key: str) -> Tensor:
        """One tensor of one shard (``acts.<hook>``, ``row_context``, ...), through the cache."""
        ck = (shard, key)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        with safe_open(str(self.path / self.shards[shard]["file"]), framework="pt") as f:
            if key not in f.keys():
                raise KeyError(f"{self.shards[shard]['file']}: no tensor {key!r}")
            t = f.get_tensor(key)
        nbytes = t.numel() * t.element_size()
        if nbytes <= self._cache_bytes:
            self._cache[ck] = t
            self._cached += nbytes
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.numel() * old.element_size()
        return t

    def split(self, holdout: float = 0.1) -> tuple[list[int], list[int]]:
        """``(train_shards, heldout_shards)``: the last ``ceil(holdout * n)`` shards held out (at least one)."""
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        if self.n_shards < 2:
            raise ValueError(f"{self.path}: {self.n_shards} shard(s); a train/held-out split needs at least 2")
        k = min(self.n_shards - 1, max(1, int(np.ceil(holdout * self.n_shards))))
        ids = list(range(self.n_shards))
        return ids[:-k], ids[-k:]

    def read(self, hook: str, shards: Sequence[int] | None = None, *,
             dtype: torch.dtype = torch.float32) -> Float[Tensor, "N d"]:
        """All rows of ``shards`` (default all), in store order."""
        self._check_hook(hook)
        ids = range(self.n_shards) if shards is None else shards
        return torch.cat([self.tensor(i, f"acts.{hook}").to(dtype) for i in ids])

    def row_indices(self, shards: Sequence[int] | None = None) -> Int[Tensor, " N"]:
        ids = range(self.n_shards) if shards is None else shards
        return torch.cat([torch.arange(self.shards[i]["first_row"], self.shards[i]["first_row"] +
                                       self.shards[i]["rows"]) for i in ids])

    def n_rows_in(self, shards: Sequence[int]) -> int:
        return sum(self.shards[i]["rows"] for i in shards)

    def batches(self, hook: str, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                shards: Sequence[int] | None = None, buffer_shards: int | None = None, drop_last: bool = False,
                with_rows: bool = False, dtype: torch.dtype = torch.float32) -> Iterator[Any]:
        """Batches of rows ``[b, d]`` (and their global row indices when ``with_rows``); see the module docstring."""
        self._check_hook(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = list(range(self.n_shards) if shards is None else shards)
        if not ids:
            return
        rng = np.random.default_rng([seed, epoch])
        order = [ids[j] for j in rng.permutation(len(ids))] if shuffle else ids
        group = buffer_shards or len(ids)
        carry_x: Tensor | None = None
        carry_r: Tensor | None = None
        for g in range(0, len(order), group):
            chunk = order[g:g + group]
            xs = [self.tensor(i, f"acts.{hook}").to(dtype) for i in chunk]
            rs = [torch.arange(self.shards[i]["first_row"], self.shards[i]["first_row"] + self.shards[i]["rows"])
                  for i in chunk]
            if carry_x is not None:
                xs.insert(0, carry_x)
                rs.insert(0, carry_r)
            X, R = torch.cat(xs), torch.cat(rs)
            if shuffle:
                p = torch.from_numpy(rng.permutation(len(X)))
                X, R = X[p], R[p]
            n_full = len(X) // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield (X[s:s + batch_size], R[s:s + batch_size]) if with_rows else X[s:s + batch_size]
            carry_x, carry_r = X[n_full:], R[n_full:]
        if carry_x is not None and len(carry_x) and not drop_last:
            yield (carry_x, carry_r) if with_rows else carry_x

    def locate(self, row: int) -> tuple[int, int]:
        """``(shard, local row)`` of global row index ``row``."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"{self.path}: row {row} out of range 0..{self.n_rows - 1}")
        s = bisect.bisect_right(self._first_rows, row) - 1
        return s, row - self._first_rows[s]

    def context(self, row: int) -> tuple[list[int], int]:
        """The tokens of the context row ``row`` was read in (BOS included) and its position there."""
        s, r = self.locate(row)
        ctx = int(self.tensor(s, "row_context")[r])
        pos = int(self.tensor(s, "row_position")[r])
        j = int((self.tensor(s, "context_index") == ctx).nonzero()[0, 0])
        toks = self.tensor(s, "context_tokens")[j]
        return [int(t) for t in toks[toks >= 0]], pos

    def contexts(self, shard: int) -> tuple[Int[Tensor, "C L"], Int[Tensor, " C"]]:
        """``(context_tokens, context_index)`` of one shard, for re-running the model on held-out contexts."""
        return self.tensor(shard, "context_tokens"), self.tensor(shard, "context_index")
