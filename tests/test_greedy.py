"""Greedy edge pruning to a faithfulness target (circuits/algorithms/greedy.py).

Oracles:
- the elimination loop on an additive metric, where greedy's choices are computed by hand;
- the batched connectivity pruning equals ``select.prune_to_connected`` mask by mask;
- on attn2l-induction, greedy equals plain backward elimination written out here (one engine call per
  candidate), its circuit is locally minimal (removing any kept edge drops faithfulness below the target,
  re-measured with the engine), its faithfulness equals the engine's re-measurement, and a rerun is identical.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_graphs import comparable

from circuits.algorithms import ALGORITHMS, DiscoveryConfig
from circuits.algorithms.greedy import Connectivity, eliminate
from circuits.algorithms.select import prune_to_connected
from circuits.discover import build_graph, discover
from circuits.tasks import get_task
from graphs.circuit import edge_ids, edge_inputs


class Additive:
    """m(C) = sum of the kept edges' weights; full = sum of all, empty = 0 (the engine's measure interface)."""

    def __init__(self, weights):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.empty, self.full = 0.0, float(self.w.sum())
        self.calls = 0

    def metric(self, kept):
        self.calls += 1
        return kept.double() @ self.w

    def faithfulness(self, values):
        return (values - self.empty) / (self.full - self.empty)


def no_pruning(masks):
    return masks


def test_eliminate_by_hand_on_an_additive_metric():
    # total 10.5, target 0.8 needs >= 8.4: remove the harmful edge 3 (-> 11), then edge 1 (-> 10); removing
    # edge 4 next would leave 8 < 8.4, so {0, 2, 4} is kept.
    m = Additive([5.0, 1.0, 3.0, -0.5, 2.0])
    kept, effect, step, stats = eliminate(m, no_pruning, torch.ones(5, dtype=torch.bool), 0.8)
    assert kept.tolist() == [True, False, True, False, True]
    assert effect.tolist() == [-5.0, -1.0, -3.0, 0.5, -2.0]  # removed at their step; kept vs the final circuit
    assert step.tolist() == [math.inf, 1.0, math.inf, 0.0, math.inf]  # edge 3 removed first, then edge 1
    assert stats["steps"] == 2 and stats["faithfulness_final"] == pytest.approx(10 / 10.5)
    assert stats["start_faithfulness"] == 1.0 and stats["target_reached"] == 1 and stats["start_edges"] == 5


def test_elimination_to_empty_ranks_every_edge_by_hand():
    # continued past the target: {0, 2, 4} (10) -> drop 4 (8) -> drop 2 (5) -> drop 0; the circuit and the
    # effects at the target are those of the plain run, and the removal order is the weights' order
    m = Additive([5.0, 1.0, 3.0, -0.5, 2.0])
    kept, effect, step, stats = eliminate(m, no_pruning, torch.ones(5, dtype=torch.bool), 0.8, to_empty=True)
    assert kept.tolist() == [True, False, True, False, True] and stats["steps"] == 2
    assert effect.tolist() == [-5.0, -1.0, -3.0, 0.5, -2.0]
    assert step.tolist() == [4.0, 1.0, 3.0, 0.0, 2.0]
    assert stats["faithfulness_final"] == pytest.approx(10 / 10.5) and stats["ranked_to_empty"] == 1


def test_multi_removal_by_hand():
    # total 10.8, target 0.8 needs >= 8.64. Single removals that keep it, best first: edge 3 (-0.5 -> 11.3),
    # 5 (0.1), 6 (0.2), 1 (1.0), 4 (2.0). Joint prefixes of 2, 4, 5: 11.2, 10.0, 8.0 -> the first 4 go in one
    # step; then no single removal keeps the target: {0, 2, 4} (10.0), as one-at-a-time elimination finds here.
    w = [5.0, 1.0, 3.0, -0.5, 2.0, 0.1, 0.2]
    m = Additive(w)
    kept, effect, step, stats = eliminate(m, no_pruning, torch.ones(7, dtype=torch.bool), 0.8, multi=True)
    assert kept.tolist() == [True, False, True, False, True, False, False]
    assert step.tolist() == [math.inf, 0.0, math.inf, 0.0, math.inf, 0.0, 0.0]  # all four in the first step
    assert effect.tolist() == pytest.approx([-5.0, -1.0, -3.0, 0.5, -2.0, -0.1, -0.2])
    assert stats["steps"] == 4 and stats["multi_removal"] == 1 and stats["faithfulness_final"] == pytest.approx(10 / 10.8)
    one = Additive(w)
    kept1, _, _, _ = eliminate(one, no_pruning, torch.ones(7, dtype=torch.bool), 0.8)
    assert torch.equal(kept, kept1) and m.calls < one.calls


def test_eliminate_breaks_ties_by_edge_index_and_stops_at_the_target():
    m = Additive([1.0, 1.0, 1.0, 1.0])
    kept, _, _, stats = eliminate(m, no_pruning, torch.ones(4, dtype=torch.bool), 0.5)
    assert kept.tolist() == [False, False, True, True]  # f = 0.5 is still >= 0.5; 0.25 is not
    assert stats["steps"] == 2
    # a start below the target: nothing to remove that reaches it, the start is returned
    kept, _, _, stats = eliminate(Additive([1.0, 1.0]), no_pruning, torch.tensor([True, False]), 0.9)
    assert kept.tolist() == [True, False] and stats["target_reached"] == 0 and stats["steps"] == 0


@pytest.fixture(scope="module")
def induction(zoo_model):
    model = zoo_model("attn2l-induction")
    task = get_task("induction", n=8, seed=1)
    return model, build_graph(model, "edge"), task


@pytest.mark.parametrize("name", ["attn2l-induction", "ioi-2l"])
def test_connectivity_equals_prune_to_connected(zoo_model, name):
    graph = build_graph(zoo_model(name), "edge")
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(64, graph.n_edges, generator=g) < torch.linspace(0.05, 0.9, 64).unsqueeze(1)
    got = Connectivity(graph)(masks)
    want = torch.stack([prune_to_connected(graph, m) for m in masks])
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < int(masks.sum())  # the masks exercise the pruning


def plain_backward_elimination(patcher, graph, target):
    """Backward elimination as stated: try removing each kept edge (then drop what is disconnected), one
    engine call per candidate; take the most faithful (ties: fewer edges, then lower edge index)."""
    full, empty = float(patcher.clean_metric.double().mean()), float(patcher.ablated_metric.double().mean())
    kept = prune_to_connected(graph, torch.ones(graph.n_edges, dtype=torch.bool))
    while True:
        best = None
        for e in torch.nonzero(kept).flatten().tolist():
            cand = kept.clone()
            cand[e] = False
            cand = prune_to_connected(graph, cand)
            f = (float(patcher.run(~cand[None])[0].double().mean()) - empty) / (full - empty)
            key = (-f, int(cand.sum()), e)
            if best is None or key < best[0]:
                best = (key, cand)
        if best is None or -best[0][0] < target:
            return kept
        kept = best[1]


def test_greedy_equals_plain_backward_elimination(induction):
    from patching.exact import EdgePatcher

    model, graph, task = induction
    batch = task.batch(model.tokenizer, "cpu")
    ref = plain_backward_elimination(EdgePatcher(model, graph, batch, metric="logit_diff"), graph, 0.8)
    res = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="logit_diff"))
    assert torch.equal(res.kept, ref)
    assert 0 < int(res.kept.sum()) < graph.n_edges
    assert res.stats["steps"] > 1 and res.forward_passes < res.ablations  # batched: masks share forward passes


@pytest.mark.parametrize("config", [DiscoveryConfig(seed=1), DiscoveryConfig(seed=1, topk=10)],
                         ids=["full-start", "eap-ig-start"])
def test_circuit_is_locally_minimal_and_remeasured(induction, config):
    from patching.exact import EdgePatcher

    model, graph, task = induction
    G = discover(model, task, "greedy", config)
    assert comparable(G) == comparable(discover(model, task, "greedy", config))  # deterministic
    kept = graph.edge_mask(edge_ids(G)).cpu()
    assert 0 < int(kept.sum()) < graph.n_edges
    target = config.faithfulness_target
    assert G.graph["stat_target_reached"] == 1
    assert G.graph["faithfulness"] == pytest.approx(G.graph["stat_faithfulness_final"], abs=1e-5)
    # re-measure with the engine: the circuit, and the circuit minus each of its edges (no connectivity pruning)
    batch = task.batch(model.tokenizer, "cpu")
    p = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    full, empty = float(p.clean_metric.double().mean()), float(p.ablated_metric.double().mean())
    edges = torch.nonzero(kept).flatten()
    minus = kept.repeat(len(edges), 1)
    minus[torch.arange(len(edges)), edges] = False
    values = p.run(~torch.cat([kept[None], minus])).double().mean(-1)
    faith = ((values - empty) / (full - empty)).tolist()
    assert faith[0] >= target and faith[0] == pytest.approx(G.graph["faithfulness"], abs=1e-5)
    assert all(f < target for f in faith[1:]), dict(zip([graph.edges[e].id for e in edges], faith[1:], strict=True))
    # each kept edge's score is the metric change of its removal from the final circuit
    scores = {ei.id: ei.score for ei in edge_inputs(G)}
    for i, e in enumerate(edges.tolist()):
        eid = graph.edges[e].id
        assert scores[eid] == pytest.approx(float(values[i + 1] - values[0]), abs=1e-4), eid
    if config.topk is not None:
        assert G.graph["stat_start_edges"] <= G.graph["stat_start_budget"] and G.graph["stat_start_topk"] == 10


def test_warm_start_costs_fewer_ablations(induction):
    model, graph, task = induction
    batch = task.batch(model.tokenizer, "cpu")
    full = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="logit_diff"))
    warm = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="logit_diff", topk=10))
    assert warm.ablations < full.ablations
    assert warm.stats["faithfulness_final"] >= 0.8


def test_kl_metric_and_target(induction):
    model, graph, task = induction
    batch = task.batch(model.tokenizer, "cpu")
    res = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="kl", faithfulness_target=0.9))
    assert res.scores.metric == "kl" and res.stats["faithfulness_target"] == 0.9
    assert res.stats["faithfulness_final"] >= 0.9 and res.stats["metric_clean"] == pytest.approx(0.0, abs=1e-5)


def test_multi_removal_on_a_model_reaches_the_target_and_is_locally_minimal(induction):
    from patching.exact import EdgePatcher

    model, graph, task = induction
    batch = task.batch(model.tokenizer, "cpu")
    res = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="logit_diff", multi_removal=True))
    one = ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(metric="logit_diff"))
    assert res.stats["faithfulness_final"] >= 0.8 and res.ablations < one.ablations
    p = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    full, empty = float(p.clean_metric.double().mean()), float(p.ablated_metric.double().mean())
    edges = torch.nonzero(res.kept).flatten()
    minus = res.kept.repeat(len(edges), 1)
    minus[torch.arange(len(edges)), edges] = False
    faith = ((p.run(~minus).double().mean(-1) - empty) / (full - empty)).tolist()
    assert all(f < 0.8 for f in faith)


def test_threshold_is_rejected(induction):
    model, graph, task = induction
    batch = task.batch(model.tokenizer, "cpu")
    with pytest.raises(ValueError, match="greedy: --threshold does not apply"):
        ALGORITHMS["greedy"](model, graph, batch, DiscoveryConfig(threshold=0.1))


def test_cli_greedy(tmp_path, capsys):
    from circuits.cli import main
    from graphs.circuit import load

    out = tmp_path / "g.json"
    rc = main(["discover", "--model", "attn2l-induction", "--task", "induction", "--method", "greedy", "-n", "8",
               "--seed", "1", "--target", "0.7", "--device", "cpu", "--no-progress", "--out", str(out), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    G = load(out)
    assert s["method"] == "greedy" and s["faithfulness"] >= 0.7 and s["edges"] == len(edge_ids(G))
    assert json.loads(G.graph["config"])["faithfulness_target"] == 0.7


def test_warns_before_a_step_that_will_take_long(caplog):
    """The cost warning is computed from one measured mask: |C0| masks per step against the limit."""
    from circuits.algorithms.greedy import _warn_cost

    m = Additive([1.0] * 100)
    with caplog.at_level("WARNING", logger="circuits.algorithms.greedy"):
        _warn_cost(m, None, torch.ones(100, dtype=torch.bool), limit_s=0.0)
    assert "each elimination step measures up to 100 masks" in caplog.text and m.calls == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="circuits.algorithms.greedy"):
        _warn_cost(m, None, torch.ones(100, dtype=torch.bool), limit_s=1e6)       # fast enough: silent
        _warn_cost(m, None, torch.ones(100, dtype=torch.bool)[:50], limit_s=0.0)  # small start: not measured
    assert caplog.text == "" and m.calls == 2
