"""Exemplars: the contexts that show what a unit does, read from the activation store (:mod:`explainers.store`).

For every unit (a column of a basis applied to one hook's stored activations) three kinds of context:

- **top**: the contexts with the largest activation of the unit (Bills et al. 2023, "Language models can explain
  neurons in language models": the explainer sees top-activating excerpts);
- **random**: contexts drawn uniformly (Bills et al.'s random excerpts: the unit's ordinary behaviour, mostly
  inactive; negatives for detection and fuzzing);
- **quantile**: the *activating* contexts (largest activation > ``active_threshold``) sorted by that activation and
  cut into ``n_quantiles`` bins of equal count, ``per_quantile`` drawn from each bin (Paulo et al. 2024, delphi:
  explanations and scores that cover weak activations as well as the strongest).

**Windows.** An exemplar is a window of at most ``window`` consecutive stored tokens of one context (BOS is not a
stored row, so it never appears), with the unit's activation on every token. Top and quantile windows are placed
around the context's largest activation (the first one when tied) with ``before`` of the window before it (the
models are causal: what precedes a token explains it); random windows start at a uniform position. Tokens are
decoded as the difference between the decoded text up to and including the token and up to the token before it,
with the context's previous token (BOS for a window at the start) as the anchor, so leading spaces are kept and
``"".join(tokens)`` is the window's text; where that fails (a character split across tokens) every token of the
window is decoded alone.

**Train / held-out split.** Whole *documents* of the corpus are assigned to the held-out side by a hash of
``(seed, document)`` (splitmix64; the share is ``holdout``), so the split is the same for every unit and every
store size and no text of a held-out document is ever shown to the explainer. The explainer's exemplars come from
the train side only, the scorers' from the held-out side only (checked again by id when scoring).

**Determinism.** Sampling uses ``numpy.random.default_rng([seed, crc32(unit), side])``: a unit's exemplars depend
on the seed, the store and the unit alone, not on which other units are selected with it. Ids are stable:
``doc{D}:{a}-{b}`` names document ``D``'s tokens ``a`` to ``b`` (end excluded), offsets as the store records them.

**Vectorised over units.** :func:`unit_activations` reads each shard once and encodes it for all requested units
together; :func:`select_windows` computes every context's maximum and arg-maximum for all units with
``numpy`` reductions over the rows; only the (cheap) sampling loops over units.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from explainers.llm.records import ActivationRecord

SIDES = ("explain", "held_out")


@dataclass(frozen=True)
class ExemplarConfig:
    """How many exemplars of each kind per side, the window and the split (module docstring)."""

    window: int = 24
    before: float = 0.75
    explain_top: int = 8
    explain_random: int = 0
    explain_per_quantile: int = 0
    held_out_top: int = 5
    held_out_random: int = 5
    held_out_per_quantile: int = 1
    n_quantiles: int = 5
    active_threshold: float = 0.0
    holdout: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"exemplar window must be >= 1 token, got {self.window}")
        if not 0.0 <= self.before <= 1.0:
            raise ValueError(f"exemplar 'before' share must be in [0, 1], got {self.before}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"held-out share must be in (0, 1), got {self.holdout}")
        if self.n_quantiles < 1:
            raise ValueError(f"n_quantiles must be >= 1, got {self.n_quantiles}")
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(SIDES)}
        bad = [k for k, v in counts.items() if v < 0]
        if bad:
            raise ValueError(f"exemplar count {bad[0]} must be >= 0, got {counts[bad[0]]}")
        for side in SIDES:
            if not self.counts(side)[0] and not self.counts(side)[1] and not self.counts(side)[2]:
                raise ValueError(f"no exemplars requested for the {side} side")

    def counts(self, side: str) -> tuple[int, int, int]:
        """``(top, random, per_quantile)`` of one side."""
        return (getattr(self, f"{side}_top"), getattr(self, f"{side}_random"), getattr(self, f"{side}_per_quantile"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExemplarConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Window:
    """A selected window before decoding: rows of the store (global indices into the arrays given to
    :func:`select_windows`, in token order), its context and document, how it was sampled, and the row of the
    context's maximum (``None`` for random windows)."""

    side: str
    source: str
    context: int
    document: int
    rows: tuple[int, ...]
    peak: int | None


@dataclass(frozen=True)
class Exemplar:
    """One window of one context with the unit's activation per token (module docstring)."""

    id: str
    side: str
    source: str
    context: int
    document: int
    doc_start: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: tuple[float, ...]

    def to_record(self) -> ActivationRecord:
        """The adapter to the LLM explainers and scorers."""
        return ActivationRecord(tokens=self.tokens, activations=self.activations, id=self.id, source=self.source)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("token_ids", "tokens", "activations"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Exemplar:
        return cls(**{f.name: (tuple(d[f.name]) if f.name in ("token_ids", "tokens", "activations") else d[f.name])
                      for f in fields(cls)})


@dataclass(frozen=True)
class UnitExemplars:
    """A unit's exemplars for the explainer (``explain``) and for the scorers (``held_out``)."""

    unit: str
    explain: tuple[Exemplar, ...]
    held_out: tuple[Exemplar, ...]

    def records(self, side: str) -> list[ActivationRecord]:
        if side not in SIDES:
            raise ValueError(f"exemplar side {side!r} unknown; one of {SIDES}")
        return [e.to_record() for e in getattr(self, side)]

    def ids(self, side: str) -> list[str]:
        return [e.id for e in getattr(self, side)]

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "explain": [e.to_dict() for e in self.explain],
                "held_out": [e.to_dict() for e in self.held_out]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitExemplars:
        return cls(unit=d["unit"], explain=tuple(Exemplar.from_dict(e) for e in d["explain"]),
                   held_out=tuple(Exemplar.from_dict(e) for e in d["held_out"]))


# --------------------------------------------------------------------------------------------- activations
@torch.no_grad()
def unit_activations(store: Any, hook: str, basis: Any, indices: Sequence[int], *, chunk_rows: int = 8192,
                     device: str | torch.device = "cpu") -> Float[Tensor, "N U"]:
    """``basis.encode`` of every stored row of ``hook``, columns ``indices`` only, in store order (float32).

    Each shard is read once and encoded in chunks of ``chunk_rows`` rows for all units together."""
    if not len(indices):
        raise ValueError("no units requested")
    n = int(basis.n_units)
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"unit index {bad[0]} out of range for {basis.describe()}")
    if store.d(hook) != int(basis.d_in):
        raise ValueError(f"{basis.describe()} reads {basis.d_in} values per token but the store holds "
                         f"{store.d(hook)} at {hook}")
    idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long, device=device)
    out = []
    for s in range(store.n_shards):
        x = store.tensor(s, f"acts.{hook}")
        for a in range(0, x.shape[0], chunk_rows):
            u = basis.encode(x[a:a + chunk_rows].to(device, torch.float32))
            out.append(u.index_select(-1, idx).to("cpu", torch.float32))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------- split
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def held_out_documents(documents: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """Boolean per document id: held out when ``splitmix64(splitmix64(seed) ^ document) / 2**64 < holdout``."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    u = (_splitmix64(np.asarray(documents, dtype=np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return u < holdout


def unit_seed(unit: str) -> int:
    return zlib.crc32(unit.encode("utf-8"))


# --------------------------------------------------------------------------------------------- selection
def select_windows(acts: np.ndarray, row_context: np.ndarray, row_position: np.ndarray,
                   row_document: np.ndarray, units: Sequence[str], cfg: ExemplarConfig) -> dict[str, list[Window]]:
    """The windows of every unit (module docstring); ``acts[r, j]`` is unit ``units[j]`` on row ``r``.

    Rows may come in any order; a context's rows are its tokens, ordered by position."""
    acts = np.asarray(acts, dtype=np.float32)
    N = acts.shape[0]
    if acts.ndim != 2 or acts.shape[1] != len(units):
        raise ValueError(f"activations must be [rows, {len(units)}], got {list(acts.shape)}")
    if not (len(row_context) == len(row_position) == len(row_document) == N) or N == 0:
        raise ValueError(f"row metadata ({len(row_context)}, {len(row_position)}, {len(row_document)}) does not "
                         f"match {N} activation rows")
    if not np.isfinite(acts).all():
        raise ValueError("activations are not finite")
    order = np.lexsort((np.asarray(row_position), np.asarray(row_context)))
    ctx = np.asarray(row_context)[order]
    a = acts[order]
    starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
    ends = np.r_[starts[1:], N]
    ctx_ids = ctx[starts]
    ctx_doc = np.asarray(row_document)[order][starts]
    held = held_out_documents(ctx_doc, cfg.holdout, cfg.seed)
    cmax = np.maximum.reduceat(a, starts, axis=0)                                   # [C, U]
    owner = np.repeat(np.arange(len(starts)), ends - starts)
    rows = np.arange(N)[:, None]
    cpeak = np.minimum.reduceat(np.where(a == cmax[owner], rows, N), starts, axis=0)  # [C, U] first arg-max
    out: dict[str, list[Window]] = {}
    for j, unit in enumerate(units):
        windows: list[Window] = []
        for k, side in enumerate(SIDES):
            rng = np.random.default_rng([cfg.seed, unit_seed(unit), k])
            cand = np.flatnonzero(held if side == "held_out" else ~held)
            n_top, n_random, per_q = cfg.counts(side)
            chosen: list[tuple[int, str]] = []
            taken = np.zeros(len(starts), dtype=bool)
            if n_top and len(cand):
                rank = cand[np.lexsort((ctx_ids[cand], -cmax[cand, j]))][:n_top]
                chosen += [(int(c), "top") for c in rank]
                taken[rank] = True
            if per_q:
                act = cand[(cmax[cand, j] > cfg.active_threshold) & ~taken[cand]]
                act = act[np.lexsort((ctx_ids[act], cmax[act, j]))]
                for q, bin_ in enumerate(np.array_split(act, cfg.n_quantiles)):
                    if len(bin_):
                        pick = np.sort(rng.choice(len(bin_), size=min(per_q, len(bin_)), replace=False))
                        chosen += [(int(c), f"quantile:{q + 1}/{cfg.n_quantiles}") for c in bin_[pick]]
                        taken[bin_[pick]] = True
            if n_random:
                rest = cand[~taken[cand]]
                if len(rest):
                    pick = np.sort(rng.choice(len(rest), size=min(n_random, len(rest)), replace=False))
                    chosen += [(int(c), "random") for c in rest[pick]]
            for c, source in chosen:
                s, e = int(starts[c]), int(ends[c])
                if source == "random":
                    lo = s + int(rng.integers(0, max(1, e - s - cfg.window + 1)))
                    peak = None
                else:
                    p = int(cpeak[c, j])
                    lo = max(s, p - int(math.floor(cfg.before * (cfg.window - 1))))
                    peak = int(order[p])
                hi = min(e, lo + cfg.window)
                lo = max(s, hi - cfg.window)
                windows.append(Window(side=side, source=source, context=int(ctx_ids[c]), document=int(ctx_doc[c]),
                                      rows=tuple(int(r) for r in order[lo:hi]), peak=peak))
        out[unit] = windows
    return out


# ---------------------------------------------------------------------------------------------- decoding
def token_strings(tokenizer: Any, ids: Sequence[int], anchor: int | None = None) -> tuple[str, ...]:
    """Each token's text as the difference of decoded prefixes after ``anchor`` (module docstring)."""
    ids = [int(i) for i in ids]
    pre = [] if anchor is None else [int(anchor)]
    prev = tokenizer.decode(pre, clean_up_tokenization_spaces=False) if pre else ""
    out = []
    for i in range(len(ids)):
        cur = tokenizer.decode(pre + ids[:i + 1], clean_up_tokenization_spaces=False)
        if not cur.startswith(prev) or "\ufffd" in cur[len(prev):]:
            return tuple(tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in ids)
        out.append(cur[len(prev):])
        prev = cur
    return tuple(out)


class StoreIndex:
    """The row and context tables of a store, concatenated over shards (row order = store order)."""

    def __init__(self, store: Any) -> None:
        cat = lambda key: np.concatenate([store.tensor(s, key).numpy() for s in range(store.n_shards)])  # noqa: E731
        self.row_context = cat("row_context").astype(np.int64)
        self.row_position = cat("row_position").astype(np.int64)
        self.row_document = cat("row_document").astype(np.int64)
        self.row_doc_position = cat("row_doc_position").astype(np.int64)
        self._ctx: dict[int, tuple[int, int]] = {}
        self._store = store
        for s in range(store.n_shards):
            for j, c in enumerate(store.tensor(s, "context_index").tolist()):
                self._ctx[int(c)] = (s, j)

    def context_tokens(self, context: int) -> np.ndarray:
        s, j = self._ctx[int(context)]
        toks = self._store.tensor(s, "context_tokens")[j].numpy()
        return toks[toks >= 0]


def build_exemplars(windows: Mapping[str, Sequence[Window]], acts: np.ndarray, units: Sequence[str],
                    index: StoreIndex, tokenizer: Any) -> dict[str, UnitExemplars]:
    """Decode the windows of :func:`select_windows` into :class:`UnitExemplars` (activations from ``acts``)."""
    acts = np.asarray(acts, dtype=np.float32)
    col = {u: j for j, u in enumerate(units)}
    decoded: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[str, ...]]] = {}
    out = {}
    for unit, ws in windows.items():
        sides: dict[str, list[Exemplar]] = {s: [] for s in SIDES}
        for w in ws:
            rows = np.asarray(w.rows)
            pos = index.row_position[rows]
            key = (w.context, int(pos[0]), int(pos[-1]))
            if key not in decoded:
                toks = index.context_tokens(w.context)
                ids = tuple(int(t) for t in toks[pos])
                anchor = int(toks[pos[0] - 1]) if pos[0] >= 1 else None
                decoded[key] = (ids, token_strings(tokenizer, ids, anchor))
            ids, strs = decoded[key]
            d0, d1 = int(index.row_doc_position[rows[0]]), int(index.row_doc_position[rows[-1]]) + 1
            sides[w.side].append(Exemplar(
                id=f"doc{w.document}:{d0}-{d1}", side=w.side, source=w.source, context=w.context, document=w.document,
                doc_start=d0, token_ids=ids, tokens=strs,
                activations=tuple(float(x) for x in acts[rows, col[unit]])))
        out[unit] = UnitExemplars(unit=unit, explain=tuple(sides["explain"]), held_out=tuple(sides["held_out"]))
    return out


def exemplars_for_units(store: Any, hook: str, basis: Any, indices: Sequence[int], units: Sequence[str],
                        tokenizer: Any, cfg: ExemplarConfig, *, index: StoreIndex | None = None,
                        device: str | torch.device = "cpu") -> dict[str, UnitExemplars]:
    """Exemplars of units ``indices`` of ``basis`` (named ``units``) from ``store``'s rows at ``hook``."""
    if len(indices) != len(units):
        raise ValueError(f"{len(indices)} unit indices for {len(units)} unit names")
    index = index or StoreIndex(store)
    acts = unit_activations(store, hook, basis, indices, device=device).numpy()
    windows = select_windows(acts, index.row_context, index.row_position, index.row_document, units, cfg)
    return build_exemplars(windows, acts, units, index, tokenizer)
