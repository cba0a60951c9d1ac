"""Faithfulness by level: feature, neuron and head/MLP circuits on the same task and prompts (issue #12, item 4).

``circuitexplain eval circuits --level feature,neuron,node`` compares how many *units* a circuit needs at each
granularity to reproduce the model's behaviour on a task. The units of each level (registry :data:`LEVELS`):

=========  ================================================================  ==========================================
level      units                                                             patched by
=========  ================================================================  ==========================================
node       attention heads ``a{L}.h{H}`` and MLPs ``m{L}``                   :class:`patching.exact.NodePatcher`
neuron     attention heads and MLP neurons ``m{L}.n{I}`` (an MLP is its      NodePatcher over
           neurons; ``neuron_heads=False``: the neurons alone)               ``ComponentGraph.from_model(m, neurons=True)``
feature    SAE features ``f{L}.{I}@{site}`` and one error node               :class:`patching.features.FeaturePatcher`
           ``err@{site}`` per spliced site (Marks et al. 2024)               over ``FeatureGraph.build`` (F1's engine)
=========  ================================================================  ==========================================

The embeddings and the logits are part of every node and neuron circuit (as in :mod:`patching.faithfulness`).

Protocol (:func:`compare_levels`):

1. ``n_prompts`` prompt pairs, split exactly as ``eval circuits`` splits them (:func:`circuits.discover.split_task`
   with ``round(split * n)`` held out and the same seed): every level *discovers* on the same discovery prompts and
   is *measured* on the same held-out prompts;
2. discovery: every unit of the level scored on the discovery prompts (``scorer``: ``atp``, attribution patching,
   Nanda 2023 / Kramar et al. 2024; or ``patch``, exact patching of each unit alone), ranked by ``|score|``
   (ties: lower index);
3. the circuit with ``k`` units is the top ``k`` of the ranking; every other unit of the level is ablated
   (``ablation``: resample by default, the corrupted prompts' activations) on the held-out prompts, in one
   patcher per level (many circuits per forward);
4. faithfulness, the project's one definition (:func:`patching.faithfulness.faithfulness`)::

       f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

   with ``m`` the task metric averaged over the held-out prompts, ``full`` the clean run and ``empty`` the
   patcher's fully ablated run (every unit of the level ablated, and for node / neuron levels the embeddings too:
   :func:`patching.faithfulness.full_and_empty`). Under resample ablation the node and neuron levels' empty run
   is the corrupted prompts' forward; so is the feature level's when one spliced site is a residual stream that
   everything downstream reads (e.g. the last layer's ``hook_resid_post``). ``m(empty)`` is reported per level;
5. a random baseline per level: ``random_seeds`` seeded random rankings (:func:`evals.faithfulness.random_masks`),
   curves averaged;
6. feature level only, the share of the effect carried by the error nodes (:func:`error_share`): ``f`` of the
   circuit of the error nodes alone (every feature ablated), ``f`` of all features with every error node
   ablated, and the error nodes' share of ``sum |score|``. A feature circuit whose error nodes carry most of the
   effect (``f(errors only) >= error_warning`` or ``f(features only) < 1 - error_warning``) explains little;
   the report says so in a warning line.

Each level's result is written to ``OUT/level-NAME.json`` as soon as it is done (atomically); a rerun with the
same settings loads it instead of recomputing (a killed run resumes at the first missing level).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

log = logging.getLogger(__name__)

LEVEL_NAMES = ("feature", "neuron", "node")
SCORERS = ("atp", "patch")


@dataclass(frozen=True)
class LevelsConfig:
    """Settings of the level comparison (module docstring).

    Attributes:
        levels: which of ``feature``, ``neuron``, ``node`` to compare, in plot order.
        saes: SAE directories (SAELens layout) spliced in for the feature level, one per site.
        n_prompts, split, seed: prompts in all, the held-out fraction (> 0) and the seed of task, split, baseline.
        ablation: ``resample`` / ``mean`` / ``zero`` for scoring and evaluation alike.
        scorer: ``atp`` (attribution patching) or ``patch`` (exact, one ablation per unit).
        units: circuit sizes in units kept (``None``: 1, 2, 5, 10, 20, 50, ... up to every unit of the level).
        random_seeds: random rankings per level for the baseline (0: none).
        max_features_per_site, min_activation: candidate features per site (``FeatureGraph.build``); default
            every feature active on the discovery prompts, so that ablating every unit of the feature level is,
            under resample ablation, the same run as ablating every unit of the other levels when a site is a
            residual stream (features never active are 0 on clean and corrupted prompts alike).
        neuron_heads: whether the neuron level's units include the attention heads (default) or only neurons.
        error_warning: the error-node share above which the report warns (module docstring, step 6).
        masks_per_call: most circuits per patcher call (memory); ``None``: the patcher chunks on its own.
        prompt_batch, chunk_size, device, dtype: engine and model settings.
    """

    levels: tuple[str, ...] = LEVEL_NAMES
    saes: tuple[str, ...] = ()
    n_prompts: int = 64
    split: float = 0.5
    seed: int = 0
    ablation: str = "resample"
    scorer: str = "atp"
    units: tuple[int, ...] | None = None
    random_seeds: int = 3
    max_features_per_site: int | None = None
    min_activation: float = 0.0
    neuron_heads: bool = True
    error_warning: float = 0.5
    masks_per_call: int | None = 64
    prompt_batch: int | None = None
    chunk_size: int | None = None
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "saes", tuple(str(s) for s in self.saes))
        if not self.levels:
            raise ValueError("--level: give at least one of " + ", ".join(LEVEL_NAMES))
        for lv in self.levels:
            if lv not in LEVEL_NAMES:
                raise ValueError(f"--level: unknown level {lv!r}; choose from {', '.join(LEVEL_NAMES)}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"--level: a level is given twice in {','.join(self.levels)}")
        if "feature" not in self.levels and self.saes:
            raise ValueError("--sae is only used by --level feature")
        if not 0 < self.split < 1:
            raise ValueError(f"--split {self.split}: the level comparison measures on held-out prompts; give a "
                             "fraction in (0, 1)")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown unit scorer {self.scorer!r}; choose one of {SCORERS}")
        if self.units is not None:
            u = tuple(int(x) for x in self.units)
            if not u or any(x < 1 for x in u) or any(b <= a for a, b in zip(u, u[1:], strict=False)):
                raise ValueError(f"--units must be increasing positive integers, got {self.units}")
            object.__setattr__(self, "units", u)
        if self.random_seeds < 0:
            raise ValueError(f"--random-seeds must be >= 0, got {self.random_seeds}")
        if not 0 < self.error_warning < 1:
            raise ValueError(f"error_warning must be in (0, 1), got {self.error_warning}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("levels", "saes", "units"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LevelsConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"LevelsConfig.from_dict: unknown field(s) {unknown}")
        d = dict(d)
        for k in ("levels", "saes", "units"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def default_units(n_units: int) -> tuple[int, ...]:
    """Every size up to 20 units, else 1, 2, 5, 10, 20, 50, ... below ``n_units``, then ``n_units`` itself."""
    if n_units <= 20:
        return tuple(range(1, n_units + 1))
    out, base = [], 1
    while True:
        for m in (1, 2, 5):
            k = m * base
            if k >= n_units:
                return (*out, n_units)
            out.append(k)
        base *= 10


# ---- levels ---------------------------------------------------------------------------------------------------

class Evaluator:
    """Mean held-out metric of circuits given as in-circuit masks over a level's units, through one patcher.

    ``to_ablate(keep)`` maps ``keep [K, U]`` (True = unit in the circuit) to the patcher's ablation masks; the
    patcher's ``run`` gives the metric per prompt. ``m_full`` / ``m_empty``: its clean and fully ablated runs."""

    def __init__(self, patcher: Any, to_ablate: Callable[[Tensor], Tensor], masks_per_call: int | None) -> None:
        from patching.faithfulness import full_and_empty

        self.patcher, self.to_ablate, self.masks_per_call = patcher, to_ablate, masks_per_call
        self.m_full, self.m_empty = full_and_empty(patcher)

    @classmethod
    def over_columns(cls, patcher: Any, columns: Sequence[int], n_nodes: int, device: Any,
                     masks_per_call: int | None) -> Evaluator:
        """The level's units are the patcher's node columns ``columns`` (of ``n_nodes``): every other node stays
        clean, a unit outside the circuit is ablated."""
        cols = torch.tensor(list(columns), dtype=torch.long)

        def to_ablate(keep: Tensor) -> Tensor:
            ablate = torch.zeros(len(keep), n_nodes, dtype=torch.bool)
            ablate[:, cols] = ~keep.cpu()
            return ablate.to(device)

        return cls(patcher, to_ablate, masks_per_call)

    def metric(self, keep: Bool[Tensor, "K U"]) -> Float[Tensor, " K"]:
        """Mean metric (float64) of each circuit."""
        from patching.faithfulness import mean_metric

        out = []
        step = self.masks_per_call or max(len(keep), 1)
        with torch.no_grad():
            for i in range(0, len(keep), step):
                out.append(mean_metric(self.patcher.run(self.to_ablate(keep[i:i + step]))).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def faithfulness(self, m: Tensor) -> Tensor:
        from patching.faithfulness import faithfulness

        return faithfulness(m, self.m_full, self.m_empty, metric=getattr(self.patcher, "metric_name", "metric"))


class Level:
    """One granularity of units on one model: ids, kinds, scores on a batch, an evaluator on a batch."""

    name = ""
    ids: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    describe: dict[str, Any] = {}

    def prepare(self, batch: Any) -> None:
        """Set up the units from the discovery prompts (the feature level picks its candidates here)."""

    def scores(self, batch: Any) -> Float[Tensor, " U"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluator(self, batch: Any) -> Evaluator:  # pragma: no cover - abstract
        raise NotImplementedError


class NodeLevel(Level):
    """Heads and MLPs (``neurons=False``) or heads and neurons (``neurons=True``) as the engine's graph nodes."""

    def __init__(self, model: Any, config: LevelsConfig, metric: Any, *, neurons: bool) -> None:
        from patching.graph import ComponentGraph

        self.model, self.config, self.metric, self.neurons = model, config, metric, neurons
        self.name = "neuron" if neurons else "node"
        self.graph = ComponentGraph.from_model(model, neurons=neurons)
        want = {"attn_head"} if (not neurons or config.neuron_heads) else set()
        want |= {"neuron"} if neurons else {"mlp", "block"}
        self.columns = [i for i, n in enumerate(self.graph.nodes) if n.kind in want]
        if not self.columns:
            raise ValueError(f"level {self.name}: the model has no {' / '.join(sorted(want))} units")
        self.ids = tuple(self.graph.nodes[i].id for i in self.columns)
        self.kinds = tuple(self.graph.nodes[i].kind for i in self.columns)
        self.describe = {"graph_nodes": self.graph.n_nodes, "unit_kinds": sorted(set(self.kinds))}

    def scores(self, batch: Any) -> Float[Tensor, " U"]:
        from patching.attribution import atp
        from patching.exact import node_patching_scores

        cfg = self.config
        if cfg.scorer == "atp":
            s = atp(self.model, self.graph, batch, ablation=cfg.ablation, metric=self.metric, level="node",
                    prompt_batch=cfg.prompt_batch)
        else:
            s = node_patching_scores(self.model, self.graph, batch, ablation=cfg.ablation, metric=self.metric,
                                     level="node", chunk_size=cfg.chunk_size, prompt_batch=cfg.prompt_batch)
        by_id = dict(zip(s.ids, s.values.tolist(), strict=True))
        return torch.tensor([by_id[i] for i in self.ids], dtype=torch.float64)

    def evaluator(self, batch: Any) -> Evaluator:
        from patching.exact import NodePatcher

        cfg = self.config
        patcher = NodePatcher(self.model, self.graph, batch, ablation=cfg.ablation, metric=self.metric,
                              chunk_size=cfg.chunk_size, prompt_batch=cfg.prompt_batch)
        return Evaluator.over_columns(patcher, self.columns, self.graph.n_nodes, patcher.ablatable.device,
                                      cfg.masks_per_call)


LEVELS: dict[str, Callable[..., Level]] = {
    "node": lambda model, config, metric: NodeLevel(model, config, metric, neurons=False),
    "neuron": lambda model, config, metric: NodeLevel(model, config, metric, neurons=True),
}


def _register_feature_level() -> None:
    from evals.levels_features import FeatureLevel

    LEVELS["feature"] = FeatureLevel


# ---- results --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LevelCurve:
    """Faithfulness against units kept for one level (and its random baseline, means over seeds)."""

    level: str
    n_units: int
    units: tuple[int, ...]
    faithfulness: tuple[float, ...]
    metric: tuple[float, ...]
    m_full: float
    m_empty: float
    random: tuple[float, ...] = ()
    random_std: tuple[float, ...] = ()
    kinds_kept: tuple[dict[str, int], ...] = ()
    top_units: tuple[tuple[str, float], ...] = ()
    scores_seconds: float = 0.0
    eval_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def units_to_reach(self, target: float) -> int | None:
        """The fewest units on the grid whose circuit reaches ``f >= target`` (None: none does)."""
        return next((k for k, f in zip(self.units, self.faithfulness, strict=True) if f >= target), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("units", "faithfulness", "metric", "random", "random_std", "kinds_kept"):
            d[k] = list(d[k])
        d["top_units"] = [list(t) for t in self.top_units]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LevelCurve:
        d = dict(d)
        for k in ("units", "faithfulness", "metric", "random", "random_std", "kinds_kept"):
            d[k] = tuple(d.get(k, ()))
        d["top_units"] = tuple((str(a), float(b)) for a, b in d.get("top_units", ()))
        return cls(**d)


def error_share(level: Level, ev: Evaluator, scores: Tensor) -> dict[str, float]:
    """The error nodes' share of the effect (module docstring, step 6): ``f_errors_only``,
    ``f_features_only`` (every error node ablated), ``score_share`` (of ``sum |score|``), ``n_error_nodes``."""
    err = torch.tensor([k == "error" for k in level.kinds], dtype=torch.bool)
    keep = torch.stack([err, ~err])
    f = ev.faithfulness(ev.metric(keep))
    total = float(scores.abs().sum())
    return {"f_errors_only": float(f[0]), "f_features_only": float(f[1]), "n_error_nodes": int(err.sum()),
            "score_share": float(scores[err].abs().sum()) / total if total > 0 else float("nan")}


def error_warning(share: Mapping[str, float], threshold: float) -> str | None:
    """The warning line when the error nodes carry most of the effect, else None: the error nodes alone reach
    ``f >= threshold``, or every feature with the error nodes ablated stays below ``1 - threshold``."""
    fe, ff = share["f_errors_only"], share["f_features_only"]
    why = []
    if fe >= threshold:
        why.append(f"the error nodes alone recover f = {fe:.3f} (>= {threshold:g})")
    if ff < 1 - threshold:
        why.append(f"every feature together, with the error nodes ablated, recovers only f = {ff:.3f} "
                   f"(< {1 - threshold:g})")
    if not why:
        return None
    return ("WARNING: the SAE error nodes carry most of the effect: " + "; ".join(why) +
            ". This feature circuit explains little of the behaviour: the SAEs miss what matters for this task.")


def evaluate_level(level: Level, train_batch: Any, test_batch: Any, config: LevelsConfig) -> LevelCurve:
    """Steps 2-6 of the module docstring for one level."""
    from evals.faithfulness import random_masks, top_masks

    t0 = time.perf_counter()
    level.prepare(train_batch)
    scores = level.scores(train_batch).double()
    t_scores = time.perf_counter() - t0
    n = len(level.ids)
    sizes = tuple(k for k in (config.units or default_units(n)) if k <= n) or (n,)
    if sizes[-1] != n and config.units is None:
        sizes = (*sizes, n)
    keep = top_masks(scores.abs(), sizes)
    rnd = random_masks(n, sizes, [config.seed + i for i in range(config.random_seeds)])
    t1 = time.perf_counter()
    ev = level.evaluator(test_batch)
    m = ev.metric(torch.cat([keep, rnd.reshape(-1, n)]))
    f = ev.faithfulness(m)
    k = len(sizes)
    f_r = f[k:].reshape(-1, k)
    kinds = sorted(set(level.kinds))
    kept = tuple({kd: int(sum(1 for j in row.nonzero().flatten().tolist() if level.kinds[j] == kd))
                  for kd in kinds} for row in keep)
    extra: dict[str, Any] = dict(level.describe)
    if "error" in level.kinds:
        extra["error_share"] = error_share(level, ev, scores)
    order = torch.sort(-scores.abs(), stable=True).indices[:20].tolist()
    return LevelCurve(
        level=level.name, n_units=n, units=sizes, faithfulness=tuple(f[:k].tolist()), metric=tuple(m[:k].tolist()),
        m_full=ev.m_full, m_empty=ev.m_empty,
        random=tuple(f_r.mean(0).tolist()) if len(f_r) else (),
        random_std=tuple(f_r.std(0, unbiased=False).tolist()) if len(f_r) else (),
        kinds_kept=kept, top_units=tuple((level.ids[j], float(scores[j])) for j in order),
        scores_seconds=t_scores, eval_seconds=time.perf_counter() - t1, extra=extra)


@dataclass(frozen=True)
class LevelsReport:
    """The comparison: one curve per level, the split, the settings."""

    model: str
    task: str
    config: LevelsConfig
    curves: dict[str, LevelCurve]
    split: dict[str, Any]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "config": self.config.to_dict(), "split": self.split,
                "curves": {k: c.to_dict() for k, c in self.curves.items()}, "warnings": list(self.warnings)}


def _digest(model: str, task: str, config: LevelsConfig, level: str) -> str:
    keep = {k: v for k, v in config.to_dict().items() if k not in ("levels", "device", "masks_per_call")}
    if level != "feature":
        keep = {k: v for k, v in keep.items() if k not in ("saes", "max_features_per_site", "min_activation")}
    text = json.dumps({"model": model, "task": task, "level": level, **keep}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def compare_levels(model: str, task: Any, config: LevelsConfig, out: str | Path | None = None, *,
                   bridge: Any = None, bases: Mapping[str, Any] | None = None) -> LevelsReport:
    """Run the comparison (module docstring). ``task``: a generator name, a ``.jsonl`` path or a
    :class:`circuits.tasks.Task`; ``out``: where each level's result is cached (resume); ``bridge``: an already
    loaded model (``model`` is then only its name); ``bases``: hook -> basis for the feature level instead of
    ``config.saes`` (not part of the resume key: pass no ``out`` with it)."""
    from circuits.discover import split_task
    from evals.run import load_eval_model, load_eval_task

    if "feature" in config.levels:
        _register_feature_level()
        if bases is None:
            from evals.levels_features import check_saes

            if not config.saes:
                raise ValueError("--level feature needs --sae DIR[,DIR...] (the SAEs spliced in, one per site)")
            check_saes(config.saes)  # one-line errors before any weights load
    the_task = task if hasattr(task, "pairs") else load_eval_task(model, task, config.n_prompts, config.seed)
    train_task, test_task = split_task(the_task, max(1, round(config.split * len(the_task))), config.seed)
    split = {"split": config.split, "seed": config.seed, "n_prompts": len(the_task),
             "n_discovery": len(train_task), "n_heldout": len(test_task)}
    curves: dict[str, LevelCurve] = {}
    outdir = Path(out) if out is not None else None
    todo = []
    for name in config.levels:
        cached = outdir / f"level-{name}.json" if outdir is not None else None
        key = _digest(model, the_task.name, config, name)
        if cached is not None and cached.is_file():
            d = json.loads(cached.read_text(encoding="utf-8"))
            if d.get("digest") == key:
                log.info("levels: %s loaded from %s", name, cached)
                curves[name] = LevelCurve.from_dict(d["curve"])
                continue
        todo.append((name, cached, key))
    if todo:
        bridge = bridge if bridge is not None else load_eval_model(model, config.device, config.dtype)
        dev = next(bridge.parameters()).device
        train_batch = train_task.batch(bridge.tokenizer, device=dev)
        test_batch = test_task.batch(bridge.tokenizer, device=dev)
        for name, cached, key in todo:
            log.info("levels: %s", name)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                if name == "feature" and bases is not None:
                    level = LEVELS[name](bridge, config, the_task.metric, bases=bases)
                else:
                    level = LEVELS[name](bridge, config, the_task.metric)
                curves[name] = evaluate_level(level, train_batch, test_batch, config)
            if cached is not None:
                atomic_write(cached, json.dumps({"digest": key, "curve": curves[name].to_dict()}, indent=1) + "\n")
    curves = {n: curves[n] for n in config.levels}
    warnings = []
    for c in curves.values():
        if "error_share" in c.extra:
            w = error_warning(c.extra["error_share"], config.error_warning)
            if w:
                warnings.append(w)
    return LevelsReport(model=model, task=the_task.name, config=config, curves=curves, split=split,
                        warnings=tuple(warnings))


__all__ = ["LEVEL_NAMES", "LEVELS", "LevelsConfig", "LevelCurve", "LevelsReport", "Level", "NodeLevel", "Evaluator",
           "compare_levels", "evaluate_level", "error_share", "error_warning", "default_units", "SCORERS"]
