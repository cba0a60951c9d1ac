"""Faithfulness curves through the real engine on zoo models, and the measured induction reference."""

import json
import math

import pytest
import torch

from evals.faithfulness import FaithfulnessConfig, evaluate_masks, faithfulness_curves


@pytest.fixture(scope="module")
def ioi(zoo_model):
    from circuits.tasks import get_task
    from patching.graph import ComponentGraph

    torch.set_num_threads(1)  # tiny models: threads only add synchronisation
    model = zoo_model("ioi-2l")
    task = get_task("ioi", n=16, seed=0)
    batch = task.batch(model.tokenizer, device="cpu")
    return model, ComponentGraph.from_model(model), batch


def _logit_diff(model, tokens, batch):
    from patching.metrics import gather_pos, logit_diff

    with torch.no_grad():
        return logit_diff(gather_pos(model(tokens), batch.pos), batch).double().mean()


def test_faithfulness_is_one_for_full_and_zero_for_empty(ioi):
    from patching.exact import EdgePatcher

    model, graph, batch = ioi
    patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    e = graph.n_edges
    ev = evaluate_masks(patcher, batch, torch.stack([torch.ones(e, dtype=torch.bool),
                                                     torch.zeros(e, dtype=torch.bool)]), "logit_diff")
    assert ev["faithfulness"].tolist() == pytest.approx([1.0, 0.0], abs=1e-4)
    # oracles without the engine: the full model is the clean run, the empty circuit under resample ablation
    # is the run on the corrupted prompts
    assert float(ev["m_full"]) == pytest.approx(float(_logit_diff(model, batch.clean, batch)), rel=1e-4)
    assert float(ev["m_empty"]) == pytest.approx(float(_logit_diff(model, batch.corrupt, batch)), abs=1e-3)
    assert float(ev["kl"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(ev["kl"][1]) == pytest.approx(float(ev["kl_empty"]), rel=1e-6)


def test_identical_masks_are_run_once_with_the_same_numbers(ioi):
    from patching.exact import EdgePatcher

    model, graph, batch = ioi
    patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    seen = []
    run = patcher.run_logits
    patcher.run_logits = lambda ablate: (seen.append(ablate.clone()), run(ablate))[1]
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(graph.n_edges, generator=g) < 0.5, torch.rand(graph.n_edges, generator=g) < 0.5
    full = torch.ones(graph.n_edges, dtype=torch.bool)
    ev = evaluate_masks(patcher, batch, torch.stack([a, b, a, full, b]), "logit_diff", masks_per_call=2)
    ran = torch.cat(seen)
    # full model, empty circuit, a, b: four distinct ablation masks (the full circuit is the full model)
    assert ran.shape[0] == 4 and torch.unique(ran, dim=0).shape[0] == 4
    # oracle: each circuit on its own, in a call of its own
    alone = [float(evaluate_masks(patcher, batch, c[None], "logit_diff")["metric"][0]) for c in (a, b, full)]
    assert ev["metric"].tolist() == pytest.approx([alone[0], alone[1], alone[0], alone[2], alone[1]], abs=1e-5)
    assert float(ev["faithfulness"][3]) == pytest.approx(1.0, abs=1e-6) and float(ev["kl"][3]) == pytest.approx(0, abs=1e-6)


def test_regression_random_baseline_well_below_eap_ig(ioi):
    """Regression: the 0.2 margins hold on the shipped ioi-2l checkpoint (random circuits are not faithful)."""
    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from evals.run import edge_importance
    from patching.exact import EdgePatcher

    model, graph, batch = ioi
    alg = get_algorithm("eap-ig")
    result = alg(model, graph, batch, resolve_config(alg, DiscoveryConfig(seed=0), "logit_diff", graph=graph))
    patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    passes = patcher.forward_passes
    cfg = FaithfulnessConfig(random_seeds=3)
    res = faithfulness_curves(patcher, batch, {"eap-ig": edge_importance(graph, result)}, metric="logit_diff",
                              config=cfg)
    c, r = res.curves["eap-ig"], res.random
    assert res.counts[-1] == graph.n_edges and res.counts[0] == graph.n_edges // 1000
    assert c.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)  # 100 % of the edges is the full model
    assert c.cpr > r.cpr + 0.2, (c.cpr, r.cpr)
    assert c.cmd < r.cmd - 0.2, (c.cmd, r.cmd)
    # one patcher, all 10 sizes x (1 method + 3 seeds) + 2 reference masks in batched forwards, each distinct
    # circuit once (the 100 % circuits are the full model, small random connected circuits are empty)
    from circuits.algorithms.select import Connectivity
    from evals.faithfulness import circuit_masks

    conn = Connectivity(graph)
    rnd = [torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
           for s in range(3)]
    circuits = torch.cat([circuit_masks(graph, imp, res.counts, "connected", conn)
                          for imp in [edge_importance(graph, result), *rnd]])
    distinct = torch.unique(torch.cat([circuits, torch.ones(1, graph.n_edges, dtype=torch.bool),
                                       torch.zeros(1, graph.n_edges, dtype=torch.bool)]), dim=0).shape[0]
    assert 2 < distinct < 2 + 10 * 4 and patcher.ablations == distinct
    assert res.forward_passes == patcher.forward_passes - passes == math.ceil(distinct / patcher.chunk_size)


def test_eval_cli_without_reference_writes_exact_keys(tmp_path, capsys):
    from circuits.cli import main  # through the entry point `eval = "evals.cli:register"`
    from evals.run import RESULT_KEYS

    out = tmp_path / "ioi"
    code = main(["eval", "circuits", "--model", "ioi-2l", "--task", "ioi", "--methods", "eap", "-n", "16",
                 "--split", "0.5", "--sizes", "1,10,100", "--random-seeds", "2", "--out", str(out), "--device", "cpu"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS == ("method", "ranking", "cpr", "cmd", "cpr_train", "cmd_train", "f", "f_train", "kl", "auc",
                           "seconds", "forward_passes", "edges")
    assert [tuple(r) for r in rows] == [RESULT_KEYS] * 2
    assert rows[0]["method"] == "eap" and rows[0]["ranking"] == "abs-score" and rows[0]["auc"] is None
    assert rows[1]["method"] == "random" and rows[1]["f"] is None
    assert rows[0]["cpr"] != rows[0]["cpr_train"]  # two different prompt sets
    details = json.loads((out / "details.json").read_text())
    assert details["split"] == {"split": 0.5, "seed": 0, "n_prompts": 16, "n_discovery": 8, "n_heldout": 8,
                                "rows_discovery": 8, "rows_heldout": 8, "in_sample_only": False, "cross_fit": False}
    assert (out / "faithfulness.png").exists() and (out / "faithfulness_train.png").exists()
    assert not (out / "roc.png").exists()
    printed = capsys.readouterr().out
    assert "no reference circuit" in printed and "held out" in printed


def test_held_out_numbers_are_measured_on_prompts_discovery_never_saw(zoo_model):
    """eval's held-out CPR is the discovery prompts' ranking measured on the held-out prompts; discovering on
    the held-out prompts themselves (the leak the split prevents) gives a different number."""
    from dataclasses import replace

    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from circuits.discover import split_task
    from circuits.tasks import get_task
    from evals.run import EvalConfig, edge_importance, evaluate_methods
    from patching.exact import EdgePatcher
    from patching.graph import ComponentGraph

    cfg = EvalConfig(methods=("eap",), n_prompts=24, split=0.5, seed=3, faithfulness=FaithfulnessConfig(random_seeds=1))
    report = evaluate_methods("ioi-2l", "ioi", cfg)
    train, test = split_task(get_task("ioi", n=24, seed=3), 12, 3)
    assert not {p.clean for p in train.pairs} & {p.clean for p in test.pairs}
    model = zoo_model("ioi-2l")
    graph = ComponentGraph.from_model(model)
    alg = get_algorithm("eap")
    rc = resolve_config(alg, DiscoveryConfig(seed=3), "logit_diff", graph=graph)

    def cpr_of(discover_on, measure_on):
        res = alg(model, graph, discover_on.batch(model.tokenizer), rc)
        b = measure_on.batch(model.tokenizer)
        patcher = EdgePatcher(model, graph, b, ablation="resample", metric="logit_diff")
        return faithfulness_curves(patcher, b, {"eap": edge_importance(graph, res)}, metric="logit_diff",
                                   config=FaithfulnessConfig(random_seeds=0)).curves["eap"].cpr

    row = report.rows[0]
    assert row["cpr"] == pytest.approx(cpr_of(train, test), abs=1e-9)
    assert row["cpr_train"] == pytest.approx(cpr_of(train, train), abs=1e-9)
    assert abs(row["cpr"] - cpr_of(test, test)) > 1e-6
    # cross-fitting: the mean of both ways, so both averages cover both prompt sets
    both = evaluate_methods("ioi-2l", "ioi", replace(cfg, cross_fit=True)).rows[0]
    assert both["cpr"] == pytest.approx((cpr_of(train, test) + cpr_of(test, train)) / 2, abs=1e-9)
    assert both["cpr_train"] == pytest.approx((cpr_of(train, train) + cpr_of(test, test)) / 2, abs=1e-9)


def test_eval_circuit_at_size_k_is_discovers_topk_circuit(ioi):
    """The circuit eval measures at size k is the connected circuit `discover --topk k` returns."""
    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from evals.faithfulness import circuit_masks
    from evals.run import edge_importance

    model, graph, batch = ioi
    alg = get_algorithm("eap-ig")
    full = alg(model, graph, batch, resolve_config(alg, DiscoveryConfig(), "logit_diff", graph=graph))
    counts = [1, 5, 11, 22, 55]
    masks = circuit_masks(graph, edge_importance(graph, full), counts)
    for k, m in zip(counts, masks, strict=True):
        res = alg(model, graph, batch, resolve_config(alg, DiscoveryConfig(topk=k), "logit_diff", graph=graph))
        assert torch.equal(m, res.kept), k
    literal = circuit_masks(graph, edge_importance(graph, full), counts, "topk")
    assert literal.sum(1).tolist() == counts and not torch.equal(literal, masks)


def test_eval_cli_unknown_method_is_a_one_line_error(tmp_path, capsys):
    from circuits.cli import main

    code = main(["eval", "circuits", "--model", "ioi-2l", "--task", "ioi", "--methods", "eap,magic",
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown discovery method 'magic'" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def induction_model(zoo_model):
    torch.set_num_threads(1)
    return zoo_model("attn2l-induction")


def test_regression_induction_reference_of_the_zoo_model(induction_model):
    """Regression: score bounds (> 0.5, > 0.8, faithfulness > 0.6) are set from the shipped attn2l-induction."""
    from circuits.tasks import get_task
    from evals.references import induction_reference
    from patching.exact import EdgePatcher
    from patching.graph import ComponentGraph

    model = induction_model
    graph = ComponentGraph.from_model(model)
    batch = get_task("induction", n=24, seed=1).batch(model.tokenizer, device="cpu")
    ref = induction_reference(model, graph, batch)
    prev = ref.details["prev_token_heads"].split(",")
    ind = ref.details["induction_heads"].split(",")
    assert prev and all(h.startswith("a0.") for h in prev)
    assert ind and all(h.startswith("a1.") for h in ind)
    for h in prev:  # a clear previous-token head: well above every other layer-0 head
        others = [v for k, v in ref.details.items() if k.startswith("prev_score_a0.") and k[11:] not in prev]
        assert ref.details[f"prev_score_{h}"] > 0.5 and all(ref.details[f"prev_score_{h}"] > 2 * o for o in others)
    assert all(ref.details[f"induction_score_{h}"] > 0.8 for h in ind)
    assert len(ref.edges) == len(prev) * (1 + len(ind)) + 2 * len(ind)
    # the measured mechanism carries the task: keeping only its edges recovers most of the logit difference,
    # ablating them destroys it
    patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    inside = graph.edge_mask(ref.edges)
    f = evaluate_masks(patcher, batch, torch.stack([inside, ~inside]), "logit_diff")["faithfulness"]
    # measured 0.68 on the shipped model: its second layer-1 head (induction score 0.77, below the reference's
    # 0.8 cut) carries most of the rest
    assert float(f[0]) > 0.6, f
    assert abs(float(f[1])) < 0.1, f


def test_acdc_recovers_the_induction_reference(induction_model):
    """ACDC's ROC as Conmy et al. draw it (one ACDC run per tau): the reference is recovered, edge AUC > 0.95."""
    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from circuits.algorithms.acdc_sweep import acdc_sweep
    from circuits.tasks import get_task
    from evals.ground_truth import sweep_rocs
    from evals.references import induction_reference
    from patching.graph import ComponentGraph

    model = induction_model
    graph = ComponentGraph.from_model(model)
    batch = get_task("induction", n=16, seed=0).batch(model.tokenizer, device="cpu")
    ref = induction_reference(model, graph, batch)
    alg = get_algorithm("acdc")
    sweep = acdc_sweep(model, graph, batch, resolve_config(alg, DiscoveryConfig(seed=0), "logit_diff", graph=graph),
                       n_taus=8)
    assert len(sweep.taus) == 9 and sweep.result.ranking_kind == "acdc-tau"
    rocs = sweep_rocs(graph, sweep.circuits, ref)
    assert rocs["edge"].auc > 0.95, rocs["edge"]
    assert len(rocs["edge"].fpr) >= 3  # points from the sweep, not only the end points


def test_eap_ig_with_the_qk_fix_finds_the_induction_circuit(induction_model):
    """AtP*'s QK fix, exposed as DiscoveryConfig.qk_fix / --qk-fix: EAP-IG's edge AUC against the induction
    reference reaches the issue's target 0.95 (measured 0.974 on 32 prompts; seeds 1, 2: 0.968, 0.955) where
    plain EAP-IG, saturated on the sharp key edge, does not (0.851)."""
    from circuits.algorithms import DiscoveryConfig, get_algorithm, resolve_config
    from circuits.tasks import get_task
    from evals.ground_truth import method_rocs
    from evals.references import induction_reference
    from patching.graph import ComponentGraph

    model = induction_model
    graph = ComponentGraph.from_model(model)
    batch = get_task("induction", n=32, seed=0).batch(model.tokenizer, device="cpu")
    ref = induction_reference(model, graph, batch)
    alg = get_algorithm("eap-ig")
    auc = {}
    for qk in (False, True):
        res = alg(model, graph, batch, resolve_config(alg, DiscoveryConfig(qk_fix=qk), "logit_diff", graph=graph))
        assert res.scores.method.endswith("qkfix") == qk
        auc[qk] = method_rocs(graph, res, ref)["edge"].auc
    assert auc[True] >= 0.95 and auc[True] > auc[False] + 0.05, auc
