"""Faithfulness integration, ROC / AUC and mask construction against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from evals.faithfulness import (
    MIB_PERCENTAGES,
    FaithfulnessConfig,
    area_under_curve,
    cmd,
    cpr,
    edge_counts,
    random_masks,
    ranking_keys,
    top_masks,
)
from evals.ground_truth import edge_roc, node_roc, node_scores_from_edges, roc_curve
from evals.references import ReferenceCircuit, edge_endpoints


def test_cpr_cmd_hand_computed():
    # x = 0.01, 0.1, 1; f = 0, 0.5, 1
    # CPR = 0.09 * 0.25 + 0.9 * 0.75 = 0.6975 ; CMD = 0.09 * 0.75 + 0.9 * 0.25 = 0.2925
    pct, f = (1.0, 10.0, 100.0), (0.0, 0.5, 1.0)
    assert cpr(pct, f) == pytest.approx(0.6975, abs=1e-12)
    assert cmd(pct, f) == pytest.approx(0.2925, abs=1e-12)
    # log x: both intervals are ln 10 wide -> ln10 * 0.25 + ln10 * 0.75
    assert cpr(pct, f, log_x=True) == pytest.approx(math.log(10.0), abs=1e-12)
    # overshoot counts in CMD through |1 - f|: f = 1.5 at every size -> CMD = 0.5 * 0.99
    assert cmd(pct, (1.5, 1.5, 1.5)) == pytest.approx(0.5 * 0.99)


def test_mib_sizes_constant_curve():
    # a perfect curve over MIB's sizes covers x from 0.001 to 1: area 0.999 (MIB does not normalise)
    assert cpr(MIB_PERCENTAGES, [1.0] * 10) == pytest.approx(0.999)
    assert cmd(MIB_PERCENTAGES, [1.0] * 10) == pytest.approx(0.0)
    assert cmd(MIB_PERCENTAGES, [0.0] * 10) == pytest.approx(0.999)


def test_area_rejects_mismatch():
    with pytest.raises(ValueError, match="as many sizes"):
        area_under_curve((1.0, 2.0), (0.5,))


def test_edge_counts_floor():
    assert edge_counts(MIB_PERCENTAGES, 1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    # 0.1 % of 250 edges is 0.25 -> 0 edges (the empty circuit); 0.5 % -> 1.25 -> 1
    assert edge_counts(MIB_PERCENTAGES, 250) == [0, 0, 1, 2, 5, 12, 25, 50, 125, 250]
    assert edge_counts((100.0,), 7) == [7]


def test_config_validation_and_roundtrip():
    c = FaithfulnessConfig(percentages=(1, 10, 100), ranking="signed", random_seeds=3, seed=4)
    assert FaithfulnessConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="increasing"):
        FaithfulnessConfig(percentages=(10, 1))
    with pytest.raises(ValueError, match="ranking"):
        FaithfulnessConfig(ranking="magnitude")


def test_top_masks_order_and_ties():
    imp = torch.tensor([0.5, 2.0, 0.5, -1.0, 3.0])
    m = top_masks(imp, [0, 1, 2, 3, 5])
    assert m.tolist() == [
        [False] * 5,
        [False, False, False, False, True],
        [False, True, False, False, True],
        [True, True, False, False, True],  # tie 0.5/0.5: lower index first
        [True] * 5,
    ]


def test_ranking_keys():
    v = torch.tensor([-2.0, 1.0, float("nan"), 0.5])
    assert ranking_keys(v, ranking="abs").tolist() == [2.0, 1.0, -math.inf, 0.5]
    # scores are m(ablated) - m(clean): ablating edge 0 lowers the metric most -> most helpful
    assert ranking_keys(v, ranking="signed").tolist() == [2.0, -1.0, -math.inf, -0.5]
    assert ranking_keys(v, ranking="signed", higher_is_better=False).tolist() == [-2.0, 1.0, -math.inf, 0.5]


def test_random_masks_nested_seeded():
    a = random_masks(50, [0, 5, 20, 50], [0, 1])
    b = random_masks(50, [0, 5, 20, 50], [0, 1])
    assert torch.equal(a, b)
    assert a.sum(-1).tolist() == [[0, 5, 20, 50], [0, 5, 20, 50]]
    assert bool((a[:, 1] <= a[:, 2]).all())  # nested
    assert not torch.equal(a[0], a[1])


def test_roc_hand_computed():
    # |scores| .95(+) .9(-) .8(+) .8(-) .3(+) .1(-)
    scores = [-0.95, 0.9, 0.8, -0.8, 0.3, 0.1]
    labels = [True, False, True, False, True, False]
    roc = roc_curve(scores, labels)
    third = 1.0 / 3.0
    assert roc.fpr == pytest.approx([0, 0, third, 2 * third, 2 * third, 1])
    assert roc.tpr == pytest.approx([0, third, third, 2 * third, 1, 1])
    assert roc.thresholds[0] == math.inf and roc.thresholds[1:] == pytest.approx([0.95, 0.9, 0.8, 0.3, 0.1])
    assert roc.auc == pytest.approx(11 / 18)
    assert (roc.n_pos, roc.n_neg) == (3, 3)


def test_auc_equals_mann_whitney():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.round(rng.normal(size=200), 1)  # rounding makes many ties
        y = rng.random(200) < 0.3
        u = mannwhitneyu(np.abs(s[y]), np.abs(s[~y]), alternative="two-sided").statistic
        assert roc_curve(s, y).auc == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_auc_of_circuit_against_itself_is_one():
    edges = ["embed->a0.h0<v>", "a0.h0->a1.h1<k>", "embed->a1.h1<q>", "a1.h1->logits", "embed->a1.h0<v>",
             "a0.h1->logits", "embed->m0"]
    ref = ReferenceCircuit.from_edges(edges[:4])
    scores = np.array([1.0 if e in ref.edges else 0.0 for e in edges])
    assert edge_roc(edges, scores, ref).auc == 1.0
    nodes = ["embed", "a0.h0", "a0.h1", "a1.h0", "a1.h1", "m0", "logits"]
    roc = node_roc(nodes, node_scores_from_edges(edges, scores), ref)
    assert roc.auc == 1.0 and roc.n_pos == 2 and roc.n_neg == 3  # embed / logits are not predictions
    # the reversed ranking is perfectly wrong
    assert edge_roc(edges, 1.0 - scores, ref).auc == 0.0


def test_roc_errors():
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_curve([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="not among the scored edges"):
        edge_roc(["a->b"], [1.0], ReferenceCircuit.from_edges(["c->d"]))


def test_reference_circuit_roundtrip():
    ref = ReferenceCircuit.from_edges(["a0.h1->a1.h2<k>", "a1.h2->logits", "a1.h2->logits"], source="x")
    assert ref.edges == ("a0.h1->a1.h2<k>", "a1.h2->logits")
    assert ref.nodes == ("a0.h1", "a1.h2", "logits")
    assert ReferenceCircuit.from_dict(ref.to_dict()) == ref
    assert edge_endpoints("a0.h1->a1.h2<k>") == ("a0.h1", "a1.h2")


def test_pessimistic_auc_is_conmy_et_als():
    """The values asserted next to ``pessimistic_auc`` in the ACDC repository (acdc/acdc_graphics.py)."""
    from evals.ground_truth import pessimistic_auc

    assert pessimistic_auc([0, 1], [0, 1]) == 0.0
    assert pessimistic_auc([0, 0.5, 1], [0, 0.5, 1]) == 0.5 ** 2
    assert pessimistic_auc([0, 0.25, 1], [0, 0.25, 1]) == 0.25 * 0.75
    assert pessimistic_auc([0, 0.25, 0.5, 1], [0, 0.25, 0.5, 1]) == 5 / 16
    assert pessimistic_auc([0, 0.25, 0.75, 1], [0, 0.25, 0.5, 1]) == 4 / 16


def test_roc_from_circuits_by_hand():
    """Three nested circuits over 6 units (2 positives): points (0, .5), (0, 1), (.5, 1) plus the ends; none is
    dominated (Conmy et al. drop a point only for one with lower FPR *and* higher TPR); AUC = (1 - 0) * .5 +
    (1 - 0) * .5 = 1. Circuits holding a negative early lower it."""
    from evals.ground_truth import pareto_points, roc_from_circuits

    labels = [True, True, False, False, False, False]
    circuits = [[True, False, False, False, False, False], [True, True, False, False, False, False],
                [True, True, True, True, False, False]]
    roc = roc_from_circuits(circuits, labels)
    assert list(zip(roc.fpr, roc.tpr, strict=True)) == [(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]
    assert roc.auc == 1.0 and roc.thresholds == (-1.0, 0.0, 1.0, 2.0, -1.0)
    worse = roc_from_circuits([[True, False, True, False, False, False], [True, True, True, True, False, False]],
                              labels)
    assert worse.auc == pytest.approx((1 - 0.25) * 0.5 + (1 - 0.5) * 0.5)
    assert pareto_points([(0.0, 0.0), (0.5, 0.4), (0.25, 0.5), (1.0, 1.0)]) == [(0.0, 0.0), (0.25, 0.5), (1.0, 1.0)]
    with pytest.raises(ValueError, match="positives"):
        roc_from_circuits(circuits, [False] * 6)


def test_method_roc_uses_the_results_ranking_not_abs_scores():
    """A removal-order ranking can disagree with |score|: the ROC must follow the ranking (larger = first) and
    put -inf (unranked) units last, never first as |.| would."""
    import math

    from circuits.algorithms import DiscoveryResult
    from evals.ground_truth import method_rocs
    from evals.references import ReferenceCircuit
    from patching.graph import ComponentGraph, Edge, Node
    from patching.scores import Scores

    nodes = (Node("embed", "embed", None), Node("a0.h0", "attn_head", 0, head=0),
             Node("a0.h1", "attn_head", 0, head=1), Node("logits", "logits", None))
    graph = ComponentGraph(nodes=nodes, edges=(Edge("embed", "a0.h0", "v"), Edge("a0.h0", "logits"),
                                               Edge("embed", "a0.h1", "v")), supports_edges=True, meta={})
    ids = tuple(e.id for e in graph.edges)
    scores = Scores(graph, "edge", torch.tensor([0.0, 0.1, 5.0]), ids, "greedy", "resample", "logit_diff", 1, 0.0)
    ref = ReferenceCircuit.from_edges(["embed->a0.h0<v>", "a0.h0->logits"])
    res = DiscoveryResult(scores, torch.tensor([True, True, False]), "edge", "greedy", 1, 0, 0.0,
                          ranking=torch.tensor([2.0, 1.0, -math.inf], dtype=torch.float64),
                          ranking_kind="removal-order")
    rocs = method_rocs(graph, res, ref)
    assert rocs["edge"].auc == 1.0 and rocs["node"].auc == 1.0
    plain = DiscoveryResult(scores, torch.tensor([True, True, False]), "edge", "eap", 1, 0, 0.0)
    assert method_rocs(graph, plain, ref)["edge"].auc == 0.0  # |score| puts the negative first
