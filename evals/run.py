"""Evaluate several discovery methods on one model and task, MIB-style: discover on one set of prompts,
measure on a disjoint one. Faithfulness curves (CPR, CMD, KL), ground-truth ROC / AUC where a reference
circuit exists, cost.

Pipeline (:func:`evaluate_methods`):

1. decide before any weights load whether every method applies (``resolve_config`` with the model's
   architecture facts; tracr models are built here and need none);
2. make ``n_prompts`` prompt pairs and split them, seeded (:func:`circuits.discover.split_task`; identical
   clean prompts stay on one side): a fraction ``split`` is held out for evaluation, the rest is what every
   method discovers on (``split=0``: one set for both, an in-sample evaluation);
3. run each method on the discovery prompts through the algorithm registry (the call ``circuits.discover``
   makes): ACDC as a sweep of tau (:mod:`circuits.algorithms.acdc_sweep`, one run per tau), greedy with its
   elimination continued to the empty circuit, so that each has a ranking that means what it says
   (``DiscoveryResult.ranking_kind``, reported per row);
4. faithfulness curves of every ranking and of random rankings, on the held-out prompts (``cpr``, ``cmd``)
   and on the discovery prompts (``cpr_train``, ``cmd_train``), each through one ``EdgePatcher``; the
   circuit at size k is the connected circuit ``discover --topk k`` keeps (:mod:`evals.faithfulness`);
   plus each method's own circuit: ``f`` / ``f_train`` and ``kl`` (held out);
5. ROC / AUC against the reference circuit (:mod:`evals.references`): exact over the ranking, or for ACDC
   Conmy et al.'s ROC over its sweep (:func:`evals.ground_truth.sweep_rocs`).

tracr models (``tracr-reverse``, ``tracr-frac_prevs``) follow Conmy et al.'s protocol: the task metric is
read at every output position (``positions="all"``, :func:`evals.tracr_circuits.tracr_batch`), ACDC scores
with their ``l2`` metric, and the reference follows the ablation (program circuit under zero ablation, task
circuit under resample / mean; ``reference`` overrides).

Node-level methods are put on the same edge axis: an edge's importance is the smaller importance of its two
endpoints (inputs and ``logits`` count as most important), so their top-k edges are the edges among their
top nodes. Their ``edges`` count is the number of graph edges between the circuit's nodes and the inputs /
logits.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.convert import owner_node
from evals.faithfulness import (
    FaithfulnessConfig,
    FaithfulnessResult,
    evaluate_masks,
    faithfulness_curves,
    ranking_keys,
)
from evals.ground_truth import IO_NODES, ROC, method_rocs, roc_curve, sweep_rocs
from evals.references import ReferenceCircuit, reference_for

log = logging.getLogger(__name__)

RESULT_KEYS = ("method", "ranking", "cpr", "cmd", "cpr_train", "cmd_train", "f", "f_train", "kl", "auc",
               "seconds", "forward_passes", "edges")
RANDOM_ROW = "random"
REFERENCES = ("auto", "program", "task")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``circuitexplain eval circuits``.

    Attributes:
        methods: registry names of the methods to compare.
        n_prompts: prompt pairs made in all (discovery + held out).
        split: fraction of them held out for evaluation, in [0, 1); 0 = evaluate on the discovery prompts.
        seed: seed of the task, the split, the methods and the random baseline.
        ablation: ``resample`` / ``mean`` / ``zero`` for discovery and evaluation alike.
        per_position: mean ablation per position.
        ig_steps: EAP-IG steps.
        chunk_size: most masks per engine forward inside the methods and the patchers.
        device: ``cuda`` / ``cpu`` / ``None`` (cuda when available).
        faithfulness: sizes, ranking, circuit construction and random seeds of the curves.
        reference: tracr reference: ``auto`` (follows the ablation), ``program`` or ``task``.
        positions: tracr tasks: read the metric at ``all`` output positions (Conmy et al.) or the ``last``.
        acdc_taus: taus in ACDC's sweep (besides its default tau).
        acdc_metric: ACDC's metric (``None``: ``l2`` on tracr models, ``kl`` otherwise).
        qk_fix: AtP*'s QK fix for the edge attribution methods (EAP, EAP-IG, greedy's EAP-IG warm start).
        prompt_batch: prompts per engine forward (memory).
        dtype: model dtype (``float32`` / ``bfloat16`` / ``float16``; ``None``: float32).
        faithfulness_target: greedy's target and the scoring methods' default circuit size.
        greedy_warm_start: greedy starts from EAP-IG's top fraction of the edges (``None`` or 0: the full
            graph; eliminating from the full graph costs ``E^2 / 2`` masks).
        cross_fit: run everything twice with the two prompt sets' roles swapped and average the numbers
            (needs ``split > 0``): each average is then over measurements on both sets, so ``cpr_train -
            cpr`` is the overfit alone, not overfit plus the difference in difficulty between two prompt sets.
    """

    methods: tuple[str, ...] = ("eap", "eap-ig")
    n_prompts: int = 64
    split: float = 0.5
    seed: int = 0
    ablation: str = "resample"
    per_position: bool = False
    ig_steps: int = 5
    chunk_size: int | None = None
    device: str | None = None
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    reference: str = "auto"
    positions: str = "all"
    acdc_taus: int = 12
    acdc_metric: str | None = None
    qk_fix: bool = False
    prompt_batch: int | None = None
    dtype: str | None = None
    faithfulness_target: float = 0.8
    greedy_warm_start: float | None = 0.4
    cross_fit: bool = False

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("EvalConfig.methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"EvalConfig.methods: duplicate method in {list(self.methods)}")
        if self.n_prompts < 1:
            raise ValueError(f"EvalConfig.n_prompts must be >= 1, got {self.n_prompts}")
        if not (math.isfinite(self.split) and 0 <= self.split < 1):
            raise ValueError(f"EvalConfig.split (--split) must be in [0, 1), got {self.split}")
        if self.reference not in REFERENCES:
            raise ValueError(f"EvalConfig.reference: unknown {self.reference!r}; choose one of {REFERENCES}")
        if self.positions not in ("all", "last"):
            raise ValueError(f"EvalConfig.positions: choose 'all' or 'last', got {self.positions!r}")
        if self.acdc_taus < 2:
            raise ValueError(f"EvalConfig.acdc_taus must be >= 2, got {self.acdc_taus}")
        if self.cross_fit and self.split == 0:
            raise ValueError("EvalConfig.cross_fit (--cross-fit) needs held-out prompts (--split > 0)")
        if self.greedy_warm_start is not None and not 0 <= self.greedy_warm_start <= 1:
            raise ValueError(f"EvalConfig.greedy_warm_start must be in [0, 1], got {self.greedy_warm_start}")

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
    """Everything one evaluation produced; ``rows`` are the ``results.json`` rows.

    ``faithfulness`` holds the held-out curves, ``faithfulness_train`` the curves on the discovery prompts
    (the same object when ``split == 0``); ``split`` the split's numbers; ``sweeps`` ACDC's tau sweeps.
    """

    model: str
    task: str
    config: EvalConfig
    rows: list[dict[str, Any]]
    faithfulness: FaithfulnessResult
    faithfulness_train: FaithfulnessResult
    rocs: dict[str, dict[str, ROC]]
    random_rocs: dict[str, float]
    reference: ReferenceCircuit | None
    methods: dict[str, dict[str, Any]]
    split: dict[str, Any] = field(default_factory=dict)
    sweeps: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "config": self.config.to_dict(), "rows": self.rows,
                "split": self.split, "faithfulness": self.faithfulness.to_dict(),
                "faithfulness_train": self.faithfulness_train.to_dict(),
                "rocs": {m: {lvl: r.to_dict() for lvl, r in d.items()} for m, d in self.rocs.items()},
                "random_auc": self.random_rocs, "reference": self.reference.to_dict() if self.reference else None,
                "methods": self.methods, "sweeps": {m: s.to_dict() for m, s in self.sweeps.items()}}


def load_eval_model(name: str, device: str | None = None, dtype: str | None = None) -> Any:
    """A zoo / pretrained / HF model through ``circuits.models.load_model``, or a tracr model (``tracr-reverse``)."""
    from evals.tracr_models import is_tracr_name, load_tracr_model

    if is_tracr_name(name):
        if dtype not in (None, "float32"):
            raise ValueError(f"--dtype {dtype}: tracr models are float32 only")
        return load_tracr_model(name, device=device)
    from circuits.models import default_device, load_model

    return load_model(name, device=device or default_device(), dtype=dtype)


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
    from circuits.discover import make_task

    return make_task(task, n, seed, model_name)


def _node_keys(graph: Any, result: Any, ranking: str, higher: bool) -> dict[str, float]:
    if result.ranking is not None:
        keys = result.importance().tolist()
    else:
        keys = ranking_keys(result.scores.values, ranking=ranking, higher_is_better=higher).tolist()
    out: dict[str, float] = {}
    for uid, k in zip(result.scores.ids, keys, strict=True):
        node = owner_node(uid, graph.node_index)  # neuron m0.n3 -> m0
        out[node] = max(out.get(node, -math.inf), k)
    return out


def edge_importance(graph: Any, result: Any, ranking: str = "abs") -> Float[Tensor, " E"]:
    """``[E]`` importances (larger = kept first) aligned with ``graph.edges`` from a ``DiscoveryResult``: its
    own ranking when it has one (greedy, ACDC), else its scores ranked by ``ranking`` (``abs`` / ``signed``)."""
    from patching.metrics import HIGHER_IS_BETTER

    higher = HIGHER_IS_BETTER.get(result.scores.metric, True)
    if result.level == "edge":
        if result.ranking is not None:
            keys = result.importance()
        else:
            keys = ranking_keys(result.scores.values, ranking=ranking, higher_is_better=higher)
        by_id = dict(zip(result.scores.ids, keys.tolist(), strict=True))
        return torch.tensor([by_id.get(e.id, -math.inf) for e in graph.edges], dtype=torch.float64)
    nk = _node_keys(graph, result, ranking, higher)

    def key(node: str) -> float:
        return math.inf if node in IO_NODES else nk.get(node, -math.inf)

    return torch.tensor([min(key(e.sender), key(e.receiver)) for e in graph.edges], dtype=torch.float64)


def ranking_label(result: Any, ranking: str) -> str:
    """What a result's curve and ROC rank by (:data:`circuits.algorithms.base.RANKING_KINDS`)."""
    if result.ranking is None and ranking == "signed":
        return "signed-score"
    return result.ranking_kind


def circuit_edges(graph: Any, result: Any) -> Bool[Tensor, " E"]:
    """The edges of a method's own circuit (node-level results: graph edges among its nodes and the I/O)."""
    if result.level == "edge":
        kept = dict(zip(result.scores.ids, result.kept.tolist(), strict=True))
        return torch.tensor([bool(kept.get(e.id, False)) for e in graph.edges], dtype=torch.bool)
    nodes = {owner_node(uid, graph.node_index)
             for uid, k in zip(result.scores.ids, result.kept.tolist(), strict=True) if k} | set(IO_NODES)
    return torch.tensor([e.sender in nodes and e.receiver in nodes for e in graph.edges], dtype=torch.bool)


def circuit_edge_count(graph: Any, result: Any) -> int:
    """Edges of the method's circuit (for node-level results: graph edges between its nodes and the I/O)."""
    return int(circuit_edges(graph, result).sum())


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


def _method_configs(config: EvalConfig, algorithms: list[Any], task_metric: str, tracr: bool, facts: Any) -> dict:
    """Every method's resolved DiscoveryConfig (raises one line before any weights load)."""
    from circuits.algorithms import DiscoveryConfig, resolve_config

    base = DiscoveryConfig(ablation=config.ablation, ig_steps=config.ig_steps, n_prompts=config.n_prompts,
                           seed=config.seed, per_position=config.per_position, chunk_size=config.chunk_size,
                           qk_fix=config.qk_fix, prompt_batch=config.prompt_batch,
                           faithfulness_target=config.faithfulness_target)
    out = {}
    for alg in algorithms:
        # AtP*'s QK fix changes edge attribution only (EAP, EAP-IG and greedy's EAP-IG warm start)
        cfg = replace(base, qk_fix=config.qk_fix and (alg.name in ("eap", "eap-ig", "greedy")))
        if alg.name == "acdc":
            cfg = replace(cfg, metric=config.acdc_metric or ("l2" if tracr else None))
        elif alg.name == "greedy":
            cfg = replace(cfg, full_ranking=True, warm_start_fraction=config.greedy_warm_start or None)
            if cfg.warm_start_fraction is None:
                cfg = replace(cfg, qk_fix=False)
        out[alg.name] = resolve_config(alg, cfg, task_metric, facts=facts)
    return out


def _batch(task: Any, model: Any, config: EvalConfig, tracr: bool, device: Any) -> Any:
    if tracr:
        from evals.tracr_circuits import tracr_batch

        return tracr_batch(task, model, config.positions, device=device)
    return task.batch(model.tokenizer, device=device)


def _orientation(bridge: Any, graph: Any, algorithms: list[Any], cfgs: dict, train_batch: Any, test_batch: Any,
                 config: EvalConfig, metric: str, same: bool) -> dict[str, Any]:
    """Discover on ``train_batch`` with every method, measure on ``test_batch`` and ``train_batch``."""
    from circuits.algorithms import resolve_config
    from circuits.algorithms.acdc_sweep import acdc_sweep
    from circuits.algorithms.engine import patcher_options
    from patching.exact import EdgePatcher

    results, methods_info, sweeps = {}, {}, {}
    for alg in algorithms:
        cfg = resolve_config(alg, cfgs[alg.name], metric, graph=graph)
        log.info("eval: running %s (%d discovery rows)", alg.name, len(train_batch))
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if alg.name == "acdc":
                sweeps[alg.name] = acdc_sweep(bridge, graph, train_batch, cfg, n_taus=config.acdc_taus)
                res = replace(sweeps[alg.name].result, forward_passes=sweeps[alg.name].forward_passes,
                              ablations=sweeps[alg.name].ablations)
            else:
                res = alg(bridge, graph, train_batch, cfg)
        results[alg.name] = replace(res, seconds=time.perf_counter() - t0)
        methods_info[alg.name] = {"level": res.level, "scoring_metric": res.scores.metric,
                                  "ranking": ranking_label(res, config.faithfulness.ranking),
                                  "ablations": int(res.ablations), "config": cfg.provenance(),
                                  "kept_units": int(res.kept.sum()), "units": len(res.scores.ids)}
    fcfg = config.faithfulness
    importance = {m: edge_importance(graph, r, fcfg.ranking) for m, r in results.items()}
    popts = patcher_options(EdgePatcher, cfgs[algorithms[0].name])

    def curves_and_own(batch: Any) -> tuple[FaithfulnessResult, dict[str, dict[str, float]]]:
        patcher = EdgePatcher(bridge, graph, batch, ablation=config.ablation, metric=metric,
                              per_position=config.per_position, chunk_size=config.chunk_size, **popts)
        faith = faithfulness_curves(patcher, batch, importance, metric=metric, config=fcfg, graph=graph)
        own = torch.stack([circuit_edges(graph, r) for r in results.values()])
        ev = evaluate_masks(patcher, batch, own, metric, masks_per_call=fcfg.masks_per_call)
        return faith, {m: {"f": float(ev["faithfulness"][i]), "kl": float(ev["kl"][i])}
                       for i, m in enumerate(results)}

    faith, own_test = curves_and_own(test_batch)
    faith_train, own_train = (faith, own_test) if same else curves_and_own(train_batch)
    return {"results": results, "methods": methods_info, "sweeps": sweeps, "faith": faith,
            "faith_train": faith_train, "own_test": own_test, "own_train": own_train}


def _rows(o: dict[str, Any], graph: Any, rocs: dict[str, dict[str, ROC]], random_auc: dict[str, float],
          has_reference: bool) -> list[dict[str, Any]]:
    rows = []
    faith, faith_train = o["faith"], o["faith_train"]
    for m, r in o["results"].items():
        auc = None
        if m in rocs:
            auc = rocs[m]["edge"].auc if "edge" in rocs[m] else rocs[m]["node"].auc
            o["methods"][m]["auc_level"] = "edge" if "edge" in rocs[m] else "node"
        c, ct = faith.curves[m], faith_train.curves[m]
        rows.append({"method": m, "ranking": o["methods"][m]["ranking"], "cpr": c.cpr, "cmd": c.cmd,
                     "cpr_train": ct.cpr, "cmd_train": ct.cmd, "f": o["own_test"][m]["f"],
                     "f_train": o["own_train"][m]["f"], "kl": o["own_test"][m]["kl"], "auc": auc,
                     "seconds": r.seconds, "forward_passes": int(r.forward_passes), "edges": circuit_edge_count(graph, r)})
    if faith.random is not None:
        rows.append({"method": RANDOM_ROW, "ranking": "random", "cpr": faith.random.cpr, "cmd": faith.random.cmd,
                     "cpr_train": faith_train.random.cpr if faith_train.random else None,
                     "cmd_train": faith_train.random.cmd if faith_train.random else None, "f": None,
                     "f_train": None, "kl": None, "auc": random_auc.get("edge") if has_reference else None,
                     "seconds": 0.0, "forward_passes": 0, "edges": None})
    for row in rows:
        assert tuple(row) == RESULT_KEYS
    return rows


AVERAGED = ("cpr", "cmd", "cpr_train", "cmd_train", "f", "f_train", "kl", "auc")
SUMMED = ("seconds", "forward_passes")


def _cross_fit_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the two orientations combined: held-out / in-sample numbers and AUC averaged, cost summed, the
    circuit size of the first orientation."""
    out = []
    for ra, rb in zip(a, b, strict=True):
        row = dict(ra)
        for k in AVERAGED:
            row[k] = None if ra[k] is None or rb[k] is None else (ra[k] + rb[k]) / 2.0
        for k in SUMMED:
            row[k] = ra[k] + rb[k]
        out.append(row)
    return out


def evaluate_methods(model: str, task: str | None, config: EvalConfig) -> EvalReport:
    """Run every method of ``config`` on ``model`` / ``task`` and evaluate them (module docstring)."""
    from circuits.algorithms import get_algorithm
    from circuits.discover import split_task
    from evals.tracr_models import is_tracr_name
    from patching.graph import ComponentGraph

    algorithms = [get_algorithm(m) for m in config.methods]  # unknown names fail before any work
    tracr = is_tracr_name(model)
    if tracr:
        import evals.tracr_circuits  # noqa: F401  (registers the l2 metric)
    facts = None
    if not tracr:
        from circuits.models import model_facts

        facts = model_facts(model)
    the_task = load_eval_task(model, task, config.n_prompts, config.seed)
    cfgs = _method_configs(config, algorithms, the_task.metric, tracr, facts)
    if config.split > 0:
        train_task, test_task = split_task(the_task, max(1, round(config.split * len(the_task))), config.seed)
    else:
        train_task = test_task = the_task
    bridge = load_eval_model(model, config.device, config.dtype)
    dev = next(bridge.parameters()).device
    train_batch = _batch(train_task, bridge, config, tracr, dev)
    test_batch = _batch(test_task, bridge, config, tracr, dev) if config.split > 0 else train_batch
    graph = ComponentGraph.from_model(bridge)
    metric = the_task.metric
    o = _orientation(bridge, graph, algorithms, cfgs, train_batch, test_batch, config, metric, config.split == 0)
    fcfg = config.faithfulness
    reference = reference_for(model, bridge, graph, train_batch, ablation=config.ablation, kind=config.reference)

    def rocs_of(o: dict[str, Any]) -> dict[str, dict[str, ROC]]:
        if reference is None:
            return {}
        return {m: (sweep_rocs(graph, o["sweeps"][m].circuits, reference) if m in o["sweeps"]
                    else method_rocs(graph, r, reference)) for m, r in o["results"].items()}

    random_auc: dict[str, float] = {}
    if reference is not None:
        random_auc = _random_auc(graph, reference, [fcfg.seed + i for i in range(max(fcfg.random_seeds, 1))])
    rocs = rocs_of(o)
    rows = _rows(o, graph, rocs, random_auc, reference is not None)
    if config.cross_fit:  # the same with the roles of the two prompt sets swapped, then averaged
        o2 = _orientation(bridge, graph, algorithms, cfgs, test_batch, train_batch, config, metric, False)
        rows = _cross_fit_rows(rows, _rows(o2, graph, rocs_of(o2), random_auc, reference is not None))
    split = {"split": config.split, "seed": config.seed, "n_prompts": len(the_task),
             "n_discovery": len(train_task), "n_heldout": len(test_task) if config.split > 0 else 0,
             "rows_discovery": len(train_batch), "rows_heldout": len(test_batch),
             "in_sample_only": config.split == 0, "cross_fit": config.cross_fit}
    return EvalReport(model=model, task=the_task.name, config=config, rows=rows, faithfulness=o["faith"],
                      faithfulness_train=o["faith_train"], rocs=rocs, random_rocs=random_auc, reference=reference,
                      methods=o["methods"], split=split, sweeps=o["sweeps"])


__all__ = ["EvalConfig", "EvalReport", "RESULT_KEYS", "evaluate_methods", "edge_importance", "circuit_edges",
           "circuit_edge_count", "load_eval_model", "load_eval_task", "ranking_label"]
