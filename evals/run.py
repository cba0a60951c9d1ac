"""Evaluate several discovery methods on one model and task: faithfulness curves (CPR, CMD), ground-truth
ROC / AUC where a reference circuit exists, cost; and write the report files.

Pipeline (:func:`evaluate_methods`): load the model (zoo / HF name, or ``tracr-reverse`` /
``tracr-frac_prevs`` through :mod:`evals.tracr_models`), tokenize the task, build the ComponentGraph, run
each method through the algorithm registry (the same call ``circuits.discover`` makes), then evaluate every
method's ranking and the random baseline through ONE ``EdgePatcher`` (:mod:`evals.faithfulness`) and
compare the scores with the reference circuit (:mod:`evals.references`, :mod:`evals.ground_truth`).

Node-level methods are put on the same edge axis: an edge's importance is the smaller importance of its two
endpoints (inputs and ``logits`` count as most important), so their top-k edges are the edges among their
top nodes. Their ``edges`` count is the number of graph edges between the circuit's nodes and the inputs /
logits.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from evals.faithfulness import FaithfulnessConfig, FaithfulnessResult, faithfulness_curves, ranking_keys
from evals.ground_truth import IO_NODES, ROC, method_rocs, roc_curve
from evals.references import ReferenceCircuit, reference_for

log = logging.getLogger(__name__)

RESULT_KEYS = ("method", "cpr", "cmd", "auc", "seconds", "forward_passes", "edges")
RANDOM_ROW = "random"


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``circuitexplain eval circuits``.

    Attributes:
        methods: registry names of the methods to compare.
        n_prompts: prompts generated for a generator task.
        seed: seed of the task, the methods and the random baseline.
        ablation: ``resample`` / ``mean`` / ``zero`` for discovery and evaluation alike.
        per_position: mean ablation per position.
        ig_steps: EAP-IG steps.
        chunk_size: most masks per engine forward inside the methods and the patcher.
        device: ``cuda`` / ``cpu`` / ``None`` (cuda when available).
        faithfulness: sizes, ranking and random seeds of the curves.
    """

    methods: tuple[str, ...] = ("eap", "eap-ig")
    n_prompts: int = 32
    seed: int = 0
    ablation: str = "resample"
    per_position: bool = False
    ig_steps: int = 5
    chunk_size: int | None = None
    device: str | None = None
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("EvalConfig.methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"EvalConfig.methods: duplicate method in {list(self.methods)}")
        if self.n_prompts < 1:
            raise ValueError(f"EvalConfig.n_prompts must be >= 1, got {self.n_prompts}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["faithfulness"] = self.faithfulness.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"EvalConfig.from_dict: unknown field(s) {unknown}")
        d = dict(d)
        if "methods" in d:
            d["methods"] = tuple(d["methods"])
        if "faithfulness" in d:
            d["faithfulness"] = FaithfulnessConfig.from_dict(d["faithfulness"])
        return cls(**d)


@dataclass(frozen=True)
class EvalReport:
    """Everything one evaluation produced; ``rows`` are the ``results.json`` rows."""

    model: str
    task: str
    config: EvalConfig
    rows: list[dict[str, Any]]
    faithfulness: FaithfulnessResult
    rocs: dict[str, dict[str, ROC]]
    random_rocs: dict[str, float]
    reference: ReferenceCircuit | None
    methods: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "config": self.config.to_dict(), "rows": self.rows,
                "faithfulness": self.faithfulness.to_dict(),
                "rocs": {m: {lvl: r.to_dict() for lvl, r in d.items()} for m, d in self.rocs.items()},
                "random_auc": self.random_rocs, "reference": self.reference.to_dict() if self.reference else None,
                "methods": self.methods}


def load_eval_model(name: str, device: str | None = None) -> Any:
    """A zoo / HF model through ``circuits.models.load_model``, or a tracr model (``tracr-reverse``)."""
    from evals.tracr_models import is_tracr_name, load_tracr_model

    if is_tracr_name(name):
        return load_tracr_model(name, device=device)
    from circuits.models import default_device, load_model

    return load_model(name, device=device or default_device())


def load_eval_task(model_name: str, task: str | None, n: int, seed: int) -> Any:
    """The task: a generator name / .jsonl path, or for tracr models their own task (the default)."""
    from evals.tracr_models import get_program, is_tracr_name

    if is_tracr_name(model_name):
        program = get_program(model_name)
        if task not in (None, program.name, f"tracr-{program.name}"):
            raise ValueError(f"--task {task!r}: tracr model {model_name} has only its own task "
                             f"{program.name!r} (omit --task)")
        from evals.tracr_circuits import tracr_task

        return tracr_task(program.name, n=n, seed=seed)
    if task is None:
        raise ValueError(f"--task is required for model {model_name!r}")
    from circuits.tasks import get_task

    return get_task(task, n=n, seed=seed)


def _node_keys(graph: Any, result: Any, ranking: str, higher: bool) -> dict[str, float]:
    keys = ranking_keys(result.scores.values, ranking=ranking, higher_is_better=higher).tolist()
    out: dict[str, float] = {}
    for uid, k in zip(result.scores.ids, keys, strict=True):
        node = uid if uid in graph.node_index else uid.split(".n")[0]
        out[node] = max(out.get(node, -math.inf), k)
    return out


def edge_importance(graph: Any, result: Any, ranking: str = "abs") -> Float[Tensor, " E"]:
    """``[E]`` importances (larger = kept first) aligned with ``graph.edges`` from a ``DiscoveryResult``."""
    from patching.metrics import HIGHER_IS_BETTER

    higher = HIGHER_IS_BETTER.get(result.scores.metric, True)
    if result.level == "edge":
        keys = ranking_keys(result.scores.values, ranking=ranking, higher_is_better=higher)
        by_id = dict(zip(result.scores.ids, keys.tolist(), strict=True))
        return torch.tensor([by_id.get(e.id, -math.inf) for e in graph.edges], dtype=torch.float64)
    nk = _node_keys(graph, result, ranking, higher)

    def key(node: str) -> float:
        return math.inf if node in IO_NODES else nk.get(node, -math.inf)

    return torch.tensor([min(key(e.sender), key(e.receiver)) for e in graph.edges], dtype=torch.float64)


def circuit_edge_count(graph: Any, result: Any) -> int:
    """Edges of the method's circuit (for node-level results: graph edges between its nodes and the I/O)."""
    if result.level == "edge":
        return int(result.kept.sum())
    kept = {uid if uid in graph.node_index else uid.split(".n")[0]
            for uid, k in zip(result.scores.ids, result.kept.tolist(), strict=True) if k}
    kept |= set(IO_NODES)
    return sum(1 for e in graph.edges if e.sender in kept and e.receiver in kept)


def _random_auc(graph: Any, reference: ReferenceCircuit, seeds: list[int]) -> dict[str, float]:
    """Mean AUC of random scores (seeded) against the reference, per level: the chance baseline."""
    from evals.ground_truth import node_roc, node_scores_from_edges

    edge_ids = [e.id for e in graph.edges]
    node_ids = [n.id for n in graph.nodes]
    ref = set(reference.edges)
    aucs: dict[str, list[float]] = {"edge": [], "node": []}
    for s in seeds:
        v = torch.rand(len(edge_ids), generator=torch.Generator().manual_seed(s), dtype=torch.float64).numpy()
        aucs["edge"].append(roc_curve(v, [e in ref for e in edge_ids]).auc)
        aucs["node"].append(node_roc(node_ids, node_scores_from_edges(edge_ids, v), reference).auc)
    return {k: float(sum(v) / len(v)) for k, v in aucs.items() if v}


def evaluate_methods(model: str, task: str | None, config: EvalConfig) -> EvalReport:
    """Run every method of ``config`` on ``model`` / ``task`` and evaluate them (module docstring)."""
    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from patching.exact import EdgePatcher
    from patching.graph import ComponentGraph

    algorithms = [get_algorithm(m) for m in config.methods]  # unknown names fail before any work
    bridge = load_eval_model(model, config.device)
    the_task = load_eval_task(model, task, config.n_prompts, config.seed)
    dev = next(bridge.parameters()).device
    batch = the_task.batch(bridge.tokenizer, device=dev)
    graph = ComponentGraph.from_model(bridge)
    base = DiscoveryConfig(ablation=config.ablation, ig_steps=config.ig_steps, n_prompts=config.n_prompts,
                           seed=config.seed, per_position=config.per_position, chunk_size=config.chunk_size)
    results, methods_info = {}, {}
    for alg in algorithms:
        cfg = resolve_config(alg, base, the_task.metric, graph=graph)
        log.info("eval: running %s on %s / %s", alg.name, model, the_task.name)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            res = alg(bridge, graph, batch, cfg)
        seconds = time.perf_counter() - t0
        results[alg.name] = replace(res, seconds=seconds)
        methods_info[alg.name] = {"level": res.level, "scoring_metric": res.scores.metric,
                                  "ablations": int(res.ablations), "config": cfg.provenance(),
                                  "kept_units": int(res.kept.sum()), "units": len(res.scores.ids)}
    fcfg = config.faithfulness
    importance = {m: edge_importance(graph, r, fcfg.ranking) for m, r in results.items()}
    patcher = EdgePatcher(bridge, graph, batch, ablation=config.ablation, metric=the_task.metric,
                          per_position=config.per_position, chunk_size=config.chunk_size)
    faith = faithfulness_curves(patcher, batch, importance, metric=the_task.metric, config=fcfg)
    reference = reference_for(model, bridge, graph, batch)
    rocs: dict[str, dict[str, ROC]] = {}
    random_auc: dict[str, float] = {}
    if reference is not None:
        rocs = {m: method_rocs(graph, r, reference) for m, r in results.items()}
        random_auc = _random_auc(graph, reference, [fcfg.seed + i for i in range(max(fcfg.random_seeds, 1))])
    rows = []
    for m, r in results.items():
        auc = None
        if m in rocs:
            auc = rocs[m]["edge"].auc if "edge" in rocs[m] else rocs[m]["node"].auc
        c = faith.curves[m]
        rows.append({"method": m, "cpr": c.cpr, "cmd": c.cmd, "auc": auc, "seconds": r.seconds,
                     "forward_passes": int(r.forward_passes), "edges": circuit_edge_count(graph, r)})
        methods_info[m]["auc_level"] = ("edge" if "edge" in rocs.get(m, {}) else "node") if m in rocs else None
    if faith.random is not None:
        rows.append({"method": RANDOM_ROW, "cpr": faith.random.cpr, "cmd": faith.random.cmd,
                     "auc": random_auc.get("edge") if reference is not None else None, "seconds": 0.0,
                     "forward_passes": 0, "edges": None})
    for row in rows:
        assert tuple(row) == RESULT_KEYS
    return EvalReport(model=model, task=the_task.name, config=config, rows=rows, faithfulness=faith, rocs=rocs,
                      random_rocs=random_auc, reference=reference, methods=methods_info)


def _fmt(v: Any, spec: str) -> str:
    width = spec.split(".")[0].rstrip("dfs") if spec[:1].isdigit() else ""
    return ("-" if v is None else format(v, spec)).rjust(int(width) if width else 0)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the result rows."""
    head = f"{'method':<12} {'CPR':>7} {'CMD':>7} {'AUC':>7} {'seconds':>9} {'fwd passes':>10} {'edges':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<12} {_fmt(r['cpr'], '7.3f')} {_fmt(r['cmd'], '7.3f')} {_fmt(r['auc'], '7.3f')} "
                     f"{_fmt(r['seconds'], '9.2f')} {_fmt(r['forward_passes'], '10d')} {_fmt(r['edges'], '7d')}")
    return "\n".join(lines)


def write_report(report: EvalReport, out: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (rows with exactly :data:`RESULT_KEYS`), ``results.csv``, ``results.md``,
    ``details.json``, ``faithfulness.png`` and (with a reference) ``roc.png``; returns the paths."""
    from evals.plots import plot_faithfulness, plot_rocs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "details": out / "details.json", "faithfulness_png": out / "faithfulness.png"}
    paths["json"].write_text(json.dumps(report.rows, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULT_KEYS))
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in report.rows])
    paths["details"].write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    task = "" if report.task == report.model else f" / {report.task}"
    title = f"{report.model}{task} ({report.config.ablation} ablation, {report.config.n_prompts} prompts)"
    plot_faithfulness(report.faithfulness, paths["faithfulness_png"], title=title)
    if report.rocs:
        paths["roc_png"] = out / "roc.png"
        plot_rocs(report.rocs, paths["roc_png"], title=title)
    paths["md"].write_text(_markdown(report, paths))
    return paths


def _markdown(report: EvalReport, paths: dict[str, Path]) -> str:
    f = report.faithfulness
    task = "" if report.task == report.model else f" / {report.task}"
    lines = [f"# Circuit evaluation: {report.model}{task}", "",
             f"Metric `{f.metric}` (full model {f.m_full:.4g}, empty circuit {f.m_empty:.4g}), "
             f"{report.config.ablation} ablation, {report.config.n_prompts} prompts, seed {report.config.seed}; "
             f"{f.n_edges} edges; sizes {', '.join(f'{p:g}%' for p in f.config.percentages)} = "
             f"{', '.join(str(c) for c in f.counts)} edges (floor). CPR = area under f, CMD = area under |1 - f| "
             f"(trapezoids over the fraction of edges, MIB). `random` = mean over {f.config.random_seeds} random "
             f"circuits of each size.", "",
             "| method | CPR | CMD | AUC | seconds | forward passes | edges |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r['method']} | {_fmt(r['cpr'], '.3f')} | {_fmt(r['cmd'], '.3f')} | {_fmt(r['auc'], '.3f')} "
                     f"| {_fmt(r['seconds'], '.2f')} | {_fmt(r['forward_passes'], 'd')} | {_fmt(r['edges'], 'd')} |")
    lines.append("")
    if report.reference is not None:
        ref = report.reference
        lines += [f"Reference circuit ({ref.source}): {len(ref.edges)} edges, {len(ref.nodes)} nodes: "
                  f"{', '.join(f'`{e}`' for e in ref.edges)}. AUC at edge level for edge methods, node level for "
                  "node methods.", ""]
    else:
        lines += ["No reference circuit for this model: AUC is not available.", ""]
    lines.append(f"![faithfulness curves]({paths['faithfulness_png'].name})")
    if "roc_png" in paths:
        lines.append(f"![ROC curves]({paths['roc_png'].name})")
    return "\n".join(lines) + "\n"


__all__ = ["EvalConfig", "EvalReport", "RESULT_KEYS", "evaluate_methods", "write_report", "format_table",
           "edge_importance", "circuit_edge_count", "load_eval_model", "load_eval_task"]
