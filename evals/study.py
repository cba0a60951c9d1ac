"""The SAE studies of issue #11: centring at matched L0 (item 6) and across architectures and scale (item 7).

A study is a list of :class:`Unit` s. A unit is one SAE: a model, a hook, an activation-store budget and a
:class:`explainers.sae.TrainConfig`. :func:`run_units` works through them:

1. per model, the activation store at each hook is collected once (``CACHE/stores/MODEL--HOOK--TOKENS``, the
   model's default corpus: its zoo task, or fortunes for ``smollm2-135m``; :func:`explainers.store.collect`,
   resumable) and shared by every SAE at that hook;
2. each unit trains in its own directory ``CACHE/saes/KEY`` (:func:`explainers.sae.train_sae`: deterministic under
   the unit's seed, resumable from its checkpoint) on the store's training shards, then
   :func:`evals.sae_metrics.evaluate_sae` measures it on the held-out shards;
3. the unit's result row (its config, every metric, a density summary) is written atomically to
   ``CACHE/saes/KEY/row.json``: the mark that the unit is done. A rerun reads finished rows back and loads no model
   whose units are all done. ``KEY`` hashes the unit's whole config, so two studies asking for the same SAE
   share it.

Matched L0 (:func:`matched_l0`): each (model, arch, centring, seed) curve of a metric against L0 over the sparsity
sweep is interpolated linearly in ``log L0`` at common L0 points, ``n`` log-spaced points spanning the range that
every curve of the (model, arch) covers (no extrapolation); then mean and standard deviation over seeds.

Relative depth: ``depth`` in (0, 1] picks ``blocks.{c-1}.hook_resid_post`` with ``c = max(1, floor(depth * n_layers
+ 1/2))`` (the residual stream after ``c`` of the ``n_layers`` blocks); the row records ``c / n_layers``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explainers.sae import TrainConfig

log = logging.getLogger(__name__)

ROW_JSON = "row.json"
METRICS = ("explained_variance", "ce_loss_recovered", "error_linear_r2", "error_kl_ratio", "mse", "l0",
           "dead_fraction", "mean_error_data_cos")
DENSITY_BINS = tuple(float(x) for x in np.linspace(-5.0, 0.0, 26))   # log10 firing frequency, 0.2 wide
SIZE_FAMILY = ("ioi-2l-d32", "ioi-2l-d64", "ioi-2l", "ioi-3l-d64", "ioi-4l-d64")
KNOB_SHORT = {"k": "k", "l1_coefficient": "l1", "jumprelu_init_threshold": "theta"}
SPARSITY_KNOB = {"topk": "k", "batchtopk": "k", "relu-l1": "l1_coefficient", "jumprelu": "jumprelu_init_threshold"}


@dataclass(frozen=True)
class StoreSpec:
    """Where and how much to collect for one (model, hook); shared by every unit at that hook."""

    model: str
    hook: str
    tokens: int
    seq_len: int = 128
    batch_size: int = 4
    shard_batches: int = 32

    @property
    def key(self) -> str:
        return f"{self.model}--{self.hook}--{self.tokens}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "tokens": self.tokens, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "shard_batches": self.shard_batches}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(**d)


@dataclass(frozen=True)
class Unit:
    """One SAE of a study: where its activations come from and how it is trained and measured."""

    store: StoreSpec
    train: TrainConfig
    holdout: float = 0.1
    ce_contexts: int = 32
    labels: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)   # width_ratio, depth...
    trim_contexts: bool = False     # CE / KL one context at a time without padding, clean / zero passes cached

    def to_dict(self) -> dict[str, Any]:
        d = {"store": self.store.to_dict(), "train": self.train.to_dict(), "holdout": self.holdout,
             "ce_contexts": self.ce_contexts, "labels": dict(self.labels)}
        if self.trim_contexts:          # only when set, so keys of units measured the default way stay valid
            d["trim_contexts"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(store=StoreSpec.from_dict(d["store"]), train=TrainConfig.from_dict(d["train"]),
                   holdout=d["holdout"], ce_contexts=d["ce_contexts"], labels=dict(d.get("labels", {})),
                   trim_contexts=bool(d.get("trim_contexts", False)))

    @property
    def sparsity(self) -> tuple[str, float]:
        """The sweep knob of the unit's architecture and its value."""
        knob = SPARSITY_KNOB[self.train.arch]
        return knob, float(getattr(self.train, knob))

    @property
    def key(self) -> str:
        """Directory name: readable prefix + a hash of the whole config."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        knob, v = self.sparsity
        t = self.train
        short = self.store.hook.replace("blocks.", "").replace("hook_", "")
        return f"{self.store.model}--{short}--{t.arch}-{t.centring}-w{t.width}-{KNOB_SHORT[knob]}{v:g}-s{t.seed}-{digest}"


def hook_at_depth(n_layers: int, depth: float) -> tuple[str, float]:
    """``(hook, actual relative depth)``: the residual stream after ``max(1, floor(depth * n + 1/2))`` blocks."""
    if not 0 < depth <= 1:
        raise ValueError(f"depth must be in (0, 1], got {depth}")
    c = max(1, min(n_layers, math.floor(depth * n_layers + 0.5)))
    return f"blocks.{c - 1}.hook_resid_post", c / n_layers


def parse_ratio(spec: str, d_in: int, what: str) -> int:
    """``"4x"`` -> ``4 * d_in``, ``"0.125x"`` -> ``d_in / 8`` (rounded, at least 1), ``"512"`` -> 512."""
    try:
        v = int(round(float(spec[:-1]) * d_in)) if spec.endswith("x") else int(spec)
    except ValueError:
        raise ValueError(f"{what} {spec!r}: expected an integer or a multiple of d_in like 4x or 0.125x") from None
    if v < 1:
        raise ValueError(f"{what} {spec!r} gives {v} for d_in {d_in}; need >= 1")
    return v


# ---------------------------------------------------------------------------------------------------------------
# running

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def density_summary(density: Sequence[float]) -> dict[str, Any]:
    """Counts of latents per ``log10`` firing-frequency bin (:data:`DENSITY_BINS`; frequencies below 1e-5 fall in
    the first bin) and summary fractions: ``dense_fraction`` (> 0.1), ``rare_fraction`` (fires, < 1e-3),
    ``median_log10_density`` over latents that fire."""
    d = np.asarray(density, dtype=np.float64)
    alive = d[d > 0]
    logs = np.clip(np.log10(alive), DENSITY_BINS[0], DENSITY_BINS[-1]) if alive.size else alive
    counts, _ = np.histogram(logs, bins=np.asarray(DENSITY_BINS))
    return {"density_hist": [int(c) for c in counts], "density_bins": list(DENSITY_BINS),
            "n_dead": int((d == 0).sum()), "dense_fraction": float((d > 0.1).mean()),
            "rare_fraction": float(((d > 0) & (d < 1e-3)).mean()),
            "median_log10_density": float(np.median(np.log10(alive))) if alive.size else float("nan")}


def _row(unit: Unit, metrics: dict[str, Any], training: dict[str, Any], d_in: int) -> dict[str, Any]:
    knob, v = unit.sparsity
    t = unit.train
    row = {"key": unit.key, "model": unit.store.model, "hook": unit.store.hook, "d_in": d_in, "arch": t.arch,
           "centring": t.centring, "width": t.width, "width_ratio": t.width / d_in, "sparsity_knob": knob,
           "sparsity": v, "seed": t.seed, "tokens": unit.store.tokens, "train_tokens": t.train_tokens,
           **unit.labels}
    row.update({m: float(metrics[m]) for m in METRICS})
    row.update({m: float(metrics[m]) for m in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_random")
                if m in metrics})
    row["n_eval_tokens"] = int(metrics["n_tokens"])
    row["train_seconds"] = float(training.get("seconds", float("nan")))
    row.update(density_summary(metrics["density"]))
    return row


def unit_done(cache: Path, unit: Unit) -> dict[str, Any] | None:
    """The finished row of ``unit`` in ``cache``, or ``None``."""
    p = Path(cache) / "saes" / unit.key / ROW_JSON
    if not p.is_file():
        return None
    row = json.loads(p.read_text())
    return row if row.get("unit") == unit.to_dict() else None


def _default_loader(name: str) -> Any:
    from circuits.models import load_model

    return load_model(name, device="cpu")


def _default_corpus(model_name: str, tokenizer: Any) -> Any:
    from evals.cli_sae import build_corpus

    return build_corpus(None, model_name, tokenizer, 0)


def train_sae(*args: Any, **kwargs: Any) -> Any:
    """:func:`explainers.sae.train_sae` (a module-level name, so tests can count the calls)."""
    from explainers.sae import train_sae as _train

    return _train(*args, **kwargs)


def run_units(units: Sequence[Unit], cache: str | os.PathLike, *, loader: Callable[[str], Any] = _default_loader,
              corpus: Callable[[str, Any], Any] = _default_corpus, progress: bool = True,
              checkpoint_every: int = 50) -> list[dict[str, Any]]:
    """Train and measure every unit not yet done (module docstring); returns the rows in ``units``' order."""
    from tqdm.auto import tqdm

    from evals.sae_metrics import evaluate_sae
    from explainers.sae import StoreSource
    from explainers.store import ActivationStore, StoreConfig, collect

    cache = Path(cache)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for u in units:
        r = unit_done(cache, u)
        if r is None:
            todo.append(u)
        else:
            rows[u.key] = r
    bar = tqdm(total=len(units), initial=len(units) - len(todo), unit="sae", desc="study", disable=not progress)
    try:
        for model_name in dict.fromkeys(u.store.model for u in todo):
            model = loader(model_name)
            stores: dict[str, Any] = {}
            clean_cache: dict[Any, Any] = {}
            for u in (u for u in todo if u.store.model == model_name):
                bar.set_postfix_str(u.key[:60])
                s = u.store
                if s.key not in stores:
                    cfg = StoreConfig(model=s.model, hooks=(s.hook,), n_tokens=s.tokens, seq_len=s.seq_len,
                                      batch_size=s.batch_size, shard_batches=s.shard_batches)
                    sdir = cache / "stores" / s.key
                    if (sdir / "manifest.json").is_file() and json.loads(
                            (sdir / "manifest.json").read_text()).get("complete"):
                        stores[s.key] = ActivationStore(sdir)
                    else:
                        stores[s.key] = collect(model, corpus(model_name, model.tokenizer), cfg, sdir,
                                                progress=progress)
                store = stores[s.key]
                train_shards, _ = store.split(u.holdout)
                source = StoreSource(store, s.hook, train_shards, buffer_shards=64)
                out = cache / "saes" / u.key
                meta = {"context_size": s.seq_len, "prepend_bos": True,
                        "dataset_path": store.manifest["settings"]["corpus"].get("name", "")}
                sae = train_sae(source, u.train, out, hook=s.hook, model=model_name, metadata=meta, device="cpu",
                                progress=False, checkpoint_every=checkpoint_every)
                if u.trim_contexts:
                    from evals.study_eval import evaluate_trimmed

                    metrics = evaluate_trimmed(model, sae, store, s.hook, holdout=u.holdout,
                                               ce_contexts=u.ce_contexts, seed=u.train.seed, out_dir=out,
                                               cache=clean_cache)
                else:
                    metrics = evaluate_sae(model, sae, store, s.hook, holdout=u.holdout, ce_contexts=u.ce_contexts,
                                           seed=u.train.seed, out_dir=out)
                training = json.loads((out / "training.json").read_text())
                row = {**_row(u, metrics, training, store.d(s.hook)), "unit": u.to_dict()}
                _write_json(out / ROW_JSON, row)
                rows[u.key] = row
                bar.update(1)
            del model
    finally:
        bar.close()
    return [rows[u.key] for u in units]


# ---------------------------------------------------------------------------------------------------------------
# matched L0

def interp_log_l0(l0: Sequence[float], values: Sequence[float], at: Sequence[float]) -> list[float]:
    """Piecewise-linear interpolation of ``values`` against ``log(l0)`` at ``log(at)``; NaN outside the curve's L0
    range (no extrapolation). Points are sorted by L0; equal L0s are averaged."""
    l0a = np.asarray(l0, dtype=np.float64)
    va = np.asarray(values, dtype=np.float64)
    if l0a.shape != va.shape or l0a.size == 0:
        raise ValueError(f"interp_log_l0: {l0a.size} L0 values for {va.size} metric values")
    if (l0a <= 0).any():
        raise ValueError(f"interp_log_l0: L0 must be > 0, got {sorted(l0a.tolist())[:3]}")
    xs, inv = np.unique(np.log(l0a), return_inverse=True)
    ys = np.bincount(inv, weights=va) / np.bincount(inv)
    out = []
    for a in np.log(np.asarray(at, dtype=np.float64)):
        if a < xs[0] - 1e-9 or a > xs[-1] + 1e-9:
            out.append(float("nan"))
        else:
            out.append(float(np.interp(min(max(a, xs[0]), xs[-1]), xs, ys)))
    return out


def common_l0_points(curves: Sequence[Sequence[float]], n: int = 3) -> list[float]:
    """``n`` log-spaced L0 points spanning the range every curve covers (empty if the ranges do not overlap)."""
    lo = max(min(c) for c in curves)
    hi = min(max(c) for c in curves)
    if lo > hi * (1 + 1e-9):
        return []
    if n == 1 or math.isclose(lo, hi):
        return [float(math.sqrt(lo * hi))]
    return [float(x) for x in np.exp(np.linspace(math.log(lo), math.log(hi), n))]


def matched_l0(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS[:4], n_points: int = 3,
               ) -> list[dict[str, Any]]:
    """One record per (model, arch, L0 point, centring): each metric interpolated at that L0 per seed, then
    ``{metric: mean, metric_std: std over seeds (ddof 1; 0 with one seed), n_seeds}``."""
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["arch"]), []).append(r)
    for (model, arch), rs in groups.items():
        curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rs:
            curves.setdefault((r["centring"], r["seed"]), []).append(r)
        points = common_l0_points([[c["l0"] for c in cv] for cv in curves.values()], n_points)
        for centring in dict.fromkeys(c for c, _ in sorted(curves)):
            seeds = sorted(s for c, s in curves if c == centring)
            per_seed = {m: np.array([interp_log_l0([c["l0"] for c in curves[centring, s]],
                                                   [c[m] for c in curves[centring, s]], points) for s in seeds])
                        for m in metrics}
            for j, p in enumerate(points):
                rec: dict[str, Any] = {"model": model, "arch": arch, "centring": centring, "l0": p,
                                       "n_seeds": len(seeds)}
                for m in metrics:
                    v = per_seed[m][:, j]
                    rec[m] = float(v.mean())
                    rec[m + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
                out.append(rec)
    return out


def centring_effects(matched: Sequence[dict[str, Any]], metrics: Sequence[str] = ("error_linear_r2",
                                                                                    "error_kl_ratio"),
                     reference: str = "mean") -> list[dict[str, Any]]:
    """At each (model, arch, L0 point): ``reference`` centring's value minus each other centring's, per metric,
    with the two seed standard deviations combined (``sqrt(s1^2 + s2^2)``)."""
    by = {(r["model"], r["arch"], round(r["l0"], 9), r["centring"]): r for r in matched}
    out = []
    for (model, arch, l0, c), r in by.items():
        if c != reference:
            continue
        for (m2, a2, l2, c2), o in by.items():
            if (m2, a2, l2) != (model, arch, l0) or c2 == reference:
                continue
            rec = {"model": model, "arch": arch, "l0": r["l0"], "versus": c2}
            for m in metrics:
                rec[f"d_{m}"] = r[m] - o[m]
                rec[f"d_{m}_std"] = math.hypot(r[m + "_std"], o[m + "_std"])
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the two studies' unit lists

@dataclass(frozen=True)
class Budget:
    """What every unit of a study shares: token budget, SAE training and measurement settings."""

    tokens: int = 50_000
    train_tokens: int = 300_000
    batch_size: int = 2048
    lr: float = 1e-3
    depth: float = 0.5
    holdout: float = 0.1
    ce_contexts: int = 32
    store_batch_size: int = 4
    shard_batches: int = 32
    trim_contexts: bool = False

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.train_tokens < self.batch_size or self.batch_size < 1:
            raise ValueError(f"need tokens >= 1 and train_tokens ({self.train_tokens}) >= batch size "
                             f"({self.batch_size}) >= 1")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        hook_at_depth(1, self.depth)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _unit(name: str, facts: Any, b: Budget, **train: Any) -> Unit:
    hook, depth = hook_at_depth(facts.n_layers, b.depth)
    store = StoreSpec(name, hook, b.tokens, batch_size=b.store_batch_size, shard_batches=b.shard_batches)
    cfg = TrainConfig(train_tokens=b.train_tokens, batch_size=b.batch_size, lr=b.lr, **train)
    labels = {"relative_depth": depth, "n_layers": facts.n_layers, "d_model": facts.d_model,
              "model_type": facts.model_type}
    return Unit(store, cfg, holdout=b.holdout, ce_contexts=b.ce_contexts, labels=labels,
                trim_contexts=b.trim_contexts)


def plan_saes(models: Sequence[str], facts: dict[str, Any], widths: Sequence[str], *, arch: str = "topk",
              centring: str = "learned", k: str = "0.125x", l1: float = 5.0, threshold: float = 1.0,
              seeds: Sequence[int] = (0,), budget: Budget = Budget()) -> list[Unit]:
    """Item 7: per model, one SAE per dictionary size (``widths``: multiples of d_model like ``4x``) at the same
    relative depth, token budget and training; ``k`` for topk / batchtopk (``0.125x`` = d_model / 8), ``l1`` for
    relu-l1, ``threshold`` (initial) for jumprelu."""
    units = []
    for name in models:
        d = facts[name].d_model
        for w in widths:
            for s in seeds:
                extra: dict[str, Any] = {}
                if arch in ("topk", "batchtopk"):
                    extra["k"] = parse_ratio(k, d, "--k")
                elif arch == "relu-l1":
                    extra["l1_coefficient"] = l1
                else:
                    extra["jumprelu_init_threshold"] = threshold
                units.append(_unit(name, facts[name], budget, arch=arch, centring=centring,
                                   width=parse_ratio(w, d, "--widths"), seed=s, **extra))
    return units


def plan_centring(models: Sequence[str], facts: dict[str, Any], *, archs: Sequence[str], centrings: Sequence[str],
                  width: str, ks: Sequence[str], l1s: Sequence[float], thresholds: Sequence[float], seeds: Sequence[int],
                  budget: Budget = Budget()) -> list[Unit]:
    """Item 6: every arch x centring x sparsity value x seed at one width, per model."""
    units = []
    for name in models:
        d = facts[name].d_model
        for arch in archs:
            if arch in ("topk", "batchtopk"):
                sweep = [{"k": parse_ratio(k, d, "--k")} for k in ks]
            elif arch == "relu-l1":
                sweep = [{"l1_coefficient": v} for v in l1s]
            else:
                sweep = [{"jumprelu_init_threshold": v} for v in thresholds]
            for c in centrings:
                for sp in sweep:
                    for s in seeds:
                        units.append(_unit(name, facts[name], budget, arch=arch, centring=c,
                                           width=parse_ratio(width, d, "--width"), seed=s, **sp))
    return units
