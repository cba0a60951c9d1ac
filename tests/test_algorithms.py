"""Algorithm logic without a model: selection, pruning, ACDC's order and its speculative batching.

The ACDC tests drive ``run_acdc`` with a patcher whose metric is a known function of the ablation mask
(a quadratic form with interactions between edges of the same receiver), and compare with sequential
ACDC written out plainly below: same kept edges, same measured effects.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest
import torch

from circuits.algorithms import ALGORITHMS, DiscoveryConfig, get_algorithm, resolve_config
from circuits.algorithms.acdc import run_acdc
from circuits.algorithms.order import acdc_receivers, node_key
from circuits.algorithms.select import nodes_touched, prune_to_connected, select_units, top_connected
from patching.graph import Edge as E
from patching.graph import Node as N


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------- a tiny graph
@dataclass
class G:
    nodes: tuple
    edges: tuple
    supports_edges: bool = True
    meta: dict = field(default_factory=dict)
    node_index: dict = field(init=False)

    def __post_init__(self):
        self.node_index = {n.id: i for i, n in enumerate(self.nodes)}


def two_layer_graph(heads: int = 2) -> G:
    """embed, heads a0.*, m0, heads a1.*, m1, logits; every edge a real attention model has."""
    nodes = [N("embed", "embed", -1)]
    for layer in range(2):
        nodes += [N(f"a{layer}.h{h}", "attn_head", layer, head=h) for h in range(heads)]
        nodes.append(N(f"m{layer}", "mlp", layer))
    nodes.append(N("logits", "logits", None))
    edges = []
    for r in nodes[1:]:
        before = [s for s in nodes if node_key(s) < node_key(r) and s.kind != "logits"
                  and not (s.kind == "attn_head" and r.kind == "attn_head" and s.layer == r.layer)]
        for s in before:
            if r.kind == "attn_head":
                edges += [E(s.id, r.id, x) for x in "qkv"]
            else:
                edges.append(E(s.id, r.id))
    return G(tuple(nodes), tuple(edges))


# ----------------------------------------------------------------------------------- selection
def test_select_units_topk_fraction_threshold_by_hand():
    s = torch.tensor([0.5, -2.0, 0.1, 2.0, float("nan"), -0.3])
    assert select_units(s, topk=2).tolist() == [False, True, False, True, False, False]  # tie: both 2.0
    assert select_units(s, topk=1).tolist() == [False, True, False, False, False, False]  # earlier wins
    # 5 non-NaN units, 40% -> 2
    assert select_units(s, topk_fraction=0.4).tolist() == [False, True, False, True, False, False]
    assert select_units(s, threshold=0.3).tolist() == [True, True, False, True, False, True]
    elig = torch.tensor([True, False, True, True, True, True])
    assert select_units(s, topk=2, eligible=elig).tolist() == [True, False, False, True, False, False]
    assert select_units(s, topk=99).sum() == 5
    with pytest.raises(ValueError, match="exactly one"):
        select_units(s, topk=1, threshold=0.1)


def test_prune_to_connected_drops_dangling_edges():
    g = two_layer_graph(heads=1)
    ids = [e.id for e in g.edges]
    keep = {"embed->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits",  # a full path
            "embed->m0",                       # m0 reaches nothing kept downstream: dangling
            "a0.h0->m1"}                       # m1 does not reach the logits
    mask = torch.tensor([i in keep for i in ids])
    out = prune_to_connected(g, mask)
    assert {i for i, k in zip(ids, out.tolist(), strict=True) if k} == {
        "embed->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"}
    # an edge from a sender no input reaches is dropped too
    mask2 = torch.tensor([i in {"a0.h0->logits"} for i in ids])
    assert not prune_to_connected(g, mask2).any()
    touched = nodes_touched(g, out)
    assert [n.id for n, t in zip(g.nodes, touched.tolist(), strict=True) if t] == ["embed", "a0.h0", "a1.h0", "logits"]


def test_top_connected_counts_the_edges_that_survive_pruning():
    g = two_layer_graph(heads=1)
    ids = [e.id for e in g.edges]
    by_id = {"a1.h0->logits": 5.0, "m1->logits": -4.0, "a0.h0->a1.h0<k>": 3.0, "embed->a0.h0<v>": 2.0,
             "embed->m1": 1.0}
    scores = torch.tensor([by_id.get(i, 0.0) for i in ids])

    def kept(mask):
        return {i for i, k in zip(ids, mask.tolist(), strict=True) if k}

    path = {"embed->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"}
    # the literal top 3 has no input -> logits path, so pruning leaves nothing
    assert kept(prune_to_connected(g, select_units(scores, topk=3))) == set()
    assert kept(top_connected(g, scores, 3)) == path
    assert kept(top_connected(g, scores, 4)) == path  # the next prefix connects 5 edges at once
    assert kept(top_connected(g, scores, 5)) == path | {"embed->m1", "m1->logits"}
    assert kept(top_connected(g, scores, 2)) == set()
    assert top_connected(g, scores, len(ids)).all()


def test_acdc_receiver_order_is_output_first_and_senders_latest_first():
    g = two_layer_graph(heads=2)
    recs = acdc_receivers(g)
    assert [r.id for r in recs] == [
        "logits", "m1", "a1.h1<q>", "a1.h0<q>", "a1.h1<k>", "a1.h0<k>", "a1.h1<v>", "a1.h0<v>",
        "m0", "a0.h1<q>", "a0.h0<q>", "a0.h1<k>", "a0.h0<k>", "a0.h1<v>", "a0.h0<v>"]
    assert [g.edges[i].sender for i in recs[0].edges] == ["m1", "a1.h1", "a1.h0", "m0", "a0.h1", "a0.h0", "embed"]
    assert sorted(i for r in recs for i in r.edges) == list(range(len(g.edges)))


# ----------------------------------------------------------------------------------- config / registry
def test_registry_and_config_defaults():
    assert set(ALGORITHMS) >= {"acdc", "eap", "eap-ig", "node-patch", "node-atp"}
    c = resolve_config(get_algorithm("acdc"), DiscoveryConfig(), "logit_diff")
    assert (c.metric, c.level, c.threshold) == ("kl", "edge", 0.01)
    c = resolve_config(get_algorithm("eap"), DiscoveryConfig(), "prob_diff")
    assert (c.metric, c.level, c.topk_fraction, c.threshold) == ("prob_diff", "edge", None, None)
    with pytest.raises(ValueError, match="threshold"):
        resolve_config(get_algorithm("acdc"), DiscoveryConfig(topk=3), "logit_diff")
    with pytest.raises(ValueError, match="level"):
        resolve_config(get_algorithm("eap"), DiscoveryConfig(level="node"), "logit_diff")
    with pytest.raises(ValueError, match="node method"):
        resolve_config(get_algorithm("eap"), DiscoveryConfig(), "logit_diff", graph=G((), (), supports_edges=False))
    with pytest.raises(ValueError, match="at most one"):
        DiscoveryConfig(topk=3, threshold=0.1)
    with pytest.raises(ValueError, match="ablation"):
        DiscoveryConfig(ablation="gaussian")
    c = DiscoveryConfig(topk_fraction=0.2, seed=3)
    assert DiscoveryConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert "progress" not in c.provenance() and "seed" in c.provenance()


# ----------------------------------------------------------------------------------- ACDC vs sequential
class QuadraticPatcher:
    """metric(mask) = x.a + x.W.x per example (x = mask as floats): a known function with interactions."""

    def __init__(self, n_edges: int, seed: int, tau: float, batch: int = 3, fail_after: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        # linear effects spread around tau so that decisions are close calls
        self.a = torch.rand(batch, n_edges, generator=gen, dtype=torch.float64) * 3 * tau
        w = torch.randn(batch, n_edges, n_edges, generator=gen, dtype=torch.float64) * tau
        w *= torch.rand(n_edges, n_edges, generator=gen) < 0.15
        self.w = torch.triu(w, diagonal=1)
        self.forward_passes = 1
        self.ablations = 0
        self.fail_after = fail_after
        self.clean_metric = self._f(torch.zeros(1, n_edges, dtype=torch.bool))[0]
        self.ablated_metric = self._f(torch.ones(1, n_edges, dtype=torch.bool))[0]

    def _f(self, masks):
        x = masks.to(torch.float64)
        quad = torch.stack([((x @ w) * x).sum(-1) for w in self.w], dim=-1)
        return x @ self.a.T + quad

    def run(self, masks):
        if self.fail_after is not None and self.forward_passes >= self.fail_after:
            raise KeyboardInterrupt
        self.forward_passes += 1
        self.ablations += masks.shape[0]
        return self._f(masks).float()


def sequential_acdc(patcher, graph, tau, use_abs=False, removed0=None):
    """ACDC exactly as written in the paper: one forward per tried edge (edges in ``removed0`` start removed and
    are never tried)."""
    removed = torch.zeros(len(graph.edges), dtype=torch.bool) if removed0 is None else removed0.clone()
    effect = torch.zeros(len(graph.edges), dtype=torch.float64)
    cur = float(patcher.run(removed[None])[0].double().mean()) if removed.any() else \
        float(patcher.clean_metric.double().mean())
    calls = 0
    for rec in acdc_receivers(graph):
        alive = rec.node == "logits" or any(
            not removed[i] for i, e in enumerate(graph.edges) if e.sender == rec.node)
        if not alive:
            removed[list(rec.edges)] = True
            continue
        for i in rec.edges:
            if removed0 is not None and removed0[i]:
                continue
            trial = removed.clone()
            trial[i] = True
            value = float(patcher.run(trial[None])[0].double().mean())
            calls += 1
            change = value - cur
            effect[i] = change
            if (abs(change) if use_abs else change) < tau:
                removed, cur = trial, value
    return ~removed, effect, calls


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [1, 3, 64])
@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_speculative_acdc_equals_sequential_acdc(seed, window, metric):
    g = two_layer_graph(heads=2)
    tau = 0.05
    ref_kept, ref_effect, ref_calls = sequential_acdc(QuadraticPatcher(len(g.edges), seed, tau), g, tau,
                                                      use_abs=metric != "kl")
    p = QuadraticPatcher(len(g.edges), seed, tau)
    cfg = DiscoveryConfig(threshold=tau, metric=metric, window=window)
    kept, effect, stats, _ = run_acdc(p, g, cfg)
    assert torch.equal(kept, ref_kept)
    tested = effect != 0
    assert torch.allclose(effect[tested], ref_effect[tested], atol=1e-5)
    assert 0 < kept.sum() < len(g.edges)  # a non-trivial circuit, so the test can fail
    assert stats["edges_tested"] == ref_calls
    assert stats["forward_passes"] == p.forward_passes and stats["ablations"] == p.ablations
    if window == 1:
        assert p.ablations == ref_calls  # one mask per decision, like sequential ACDC
    else:
        assert p.forward_passes - 1 < ref_calls  # batching saves model calls


def test_speculation_corrects_wrong_guesses():
    """Across seeds the speculative path must both guess wrong and still agree (covered above)."""
    g = two_layer_graph(heads=2)
    wrong = 0
    for seed in range(6):
        _, _, stats, _ = run_acdc(QuadraticPatcher(len(g.edges), seed, 0.05), g, DiscoveryConfig(threshold=0.05))
        wrong += stats["wrong_guesses"]
    assert wrong > 0


def test_acdc_resume_after_interrupt_gives_the_same_result(tmp_path):
    g = two_layer_graph(heads=2)
    ckpt = tmp_path / "state.json"
    cfg = DiscoveryConfig(threshold=0.05, window=2, checkpoint=str(ckpt), resume=True)
    full_kept, full_effect, _, _ = run_acdc(QuadraticPatcher(len(g.edges), 1, 0.05), g,
                                            DiscoveryConfig(threshold=0.05, window=2))
    with pytest.raises(KeyboardInterrupt):
        run_acdc(QuadraticPatcher(len(g.edges), 1, 0.05, fail_after=8), g, cfg, fingerprint="x")
    saved = json.loads(ckpt.read_text())
    assert 0 < saved["next_receiver"] < len(acdc_receivers(g))
    p = QuadraticPatcher(len(g.edges), 1, 0.05)
    kept, effect, stats, _ = run_acdc(p, g, cfg, fingerprint="x")
    assert torch.equal(kept, full_kept) and torch.allclose(effect, full_effect)
    assert stats["forward_passes"] == saved["forward_passes"] + p.forward_passes
    with pytest.raises(ValueError, match="different"):
        run_acdc(QuadraticPatcher(len(g.edges), 1, 0.05), g, cfg, fingerprint="other")


# ----------------------------------------------------------------------------------- ACDC warm start and tau sweep
@pytest.mark.parametrize("seed", range(4))
def test_acdc_with_edges_removed_up_front_equals_sequential_acdc_on_the_candidates(seed):
    g = two_layer_graph(heads=2)
    tau = 0.05
    gen = torch.Generator().manual_seed(100 + seed)
    removed0 = torch.rand(len(g.edges), generator=gen) < 0.5
    ref_kept, ref_effect, ref_calls = sequential_acdc(QuadraticPatcher(len(g.edges), seed, tau), g, tau,
                                                      removed0=removed0)
    p = QuadraticPatcher(len(g.edges), seed, tau)
    kept, effect, stats, _ = run_acdc(p, g, DiscoveryConfig(threshold=tau), removed=removed0)
    assert torch.equal(kept, ref_kept) and not bool((kept & removed0).any())  # no removed edge comes back
    tested = ~torch.isnan(effect) & (effect != 0)
    assert torch.allclose(effect[tested], ref_effect[tested], atol=1e-5)
    assert bool(torch.isnan(effect[removed0]).all())  # never tried: no measured change
    assert stats["edges_tested"] == ref_calls < int((~removed0).sum()) + 1


def test_acdc_warm_start_with_every_edge_a_candidate_is_plain_acdc():
    g = two_layer_graph(heads=2)
    plain = run_acdc(QuadraticPatcher(len(g.edges), 2, 0.05), g, DiscoveryConfig(threshold=0.05))
    warm = run_acdc(QuadraticPatcher(len(g.edges), 2, 0.05), g, DiscoveryConfig(threshold=0.05),
                    removed=torch.zeros(len(g.edges), dtype=torch.bool))
    assert torch.equal(plain[0], warm[0]) and torch.equal(plain[1], warm[1])


def test_tau_sweep_equals_a_fresh_acdc_run_per_tau_and_reuses_work():
    from circuits.algorithms.acdc_sweep import run_sweep, sweep_ranking

    g = two_layer_graph(heads=2)
    taus = [0.005, 0.02, 0.05, 0.1, 0.3]
    p = QuadraticPatcher(len(g.edges), 3, 0.05)
    runs, per_tau = run_sweep(p, g, DiscoveryConfig(metric="kl"), taus)
    independent = 0
    for tau, (kept, _, _) in zip(taus, runs, strict=True):
        ref_kept, _, calls = sequential_acdc(QuadraticPatcher(len(g.edges), 3, 0.05), g, tau)
        assert torch.equal(kept, ref_kept), tau
        independent += calls
    sizes = [int(k.sum()) for k, _, _ in runs]
    assert sizes[0] > sizes[-1] and len(set(sizes)) > 2  # the sweep spans circuit sizes
    assert p.ablations < independent  # masks shared between taus are measured once
    assert per_tau[-1]["cache_hits"] > 0
    # ranking: the largest tau keeping the edge, then how many taus keep it; edges no tau keeps last
    C = torch.stack([k for k, _, _ in runs])
    rank = sweep_ranking(taus, C)
    for e in range(len(g.edges)):
        keeping = [i for i in range(len(taus)) if C[i, e]]
        if keeping:
            assert rank[e] == pytest.approx(max(keeping) + len(keeping) / (len(taus) + 1))
        else:
            assert rank[e] == -1.0
    # with the effects: never-kept edges by |effect| in (-1, 0), untried (NaN) at -1; kept edges unchanged
    C2 = torch.tensor([[True, False, False, False], [True, True, False, False]])
    ranked = sweep_ranking([0.1, 0.2], C2, torch.tensor([0.1, -0.3, -2.0, float("nan")], dtype=torch.float64))
    assert ranked.tolist() == pytest.approx([1 + 2 / 3, 1 + 1 / 3, -1 + 2 / 3, -1.0])


def test_default_taus_span_the_metric_range_and_contain_the_default():
    from circuits.algorithms.acdc_sweep import default_taus

    t = default_taus(2.0, 0.01, n=5)
    assert t == sorted(t) and 0.01 in t and t[0] == pytest.approx(2e-4) and t[-1] == pytest.approx(2.0)
    assert len(t) == 6


# ----------------------------------------------------------------------------------- requests decided up front
@pytest.mark.parametrize("method,config,msg", [
    ("eap", DiscoveryConfig(metric="kl"), "'eap' reads the gradient of metric 'kl' only at the clean run"),
    ("node-atp", DiscoveryConfig(metric="kl"), "metric 'kl' only at the clean run"),
    ("eap-ig", DiscoveryConfig(metric="accuracy"), "'accuracy' is not differentiable"),
    ("eap-ig", DiscoveryConfig(metric="kl", ig_steps=1), "steps=1"),
    ("greedy", DiscoveryConfig(metric="kl", topk=10, ig_steps=1), "greedy (its EAP-IG warm start)"),
    ("greedy", DiscoveryConfig(metric="accuracy", warm_start=10), "greedy (its EAP-IG warm start)"),
    ("greedy", DiscoveryConfig(threshold=0.1), "greedy': --threshold does not apply"),
    ("eap", DiscoveryConfig(warm_start=10), "takes no warm start"),
    ("acdc", DiscoveryConfig(topk=10), "--topk does not apply"),
    ("eap", DiscoveryConfig(metric="bleu"), "unknown metric 'bleu'"),
    ("node-atp", DiscoveryConfig(qk_fix=True), "--qk-fix applies to the edge attribution methods"),
    ("acdc", DiscoveryConfig(qk_fix=True), "--qk-fix applies to the edge attribution methods"),
])
def test_inapplicable_requests_are_one_line_errors(method, config, msg):
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        resolve_config(get_algorithm(method), config, "logit_diff")
    assert "\n" not in str(e.value)


def test_applicable_gradient_requests_pass():
    c = resolve_config(get_algorithm("eap-ig"), DiscoveryConfig(metric="kl"), "logit_diff")  # IG integrates KL
    assert c.metric == "kl"
    c = resolve_config(get_algorithm("acdc"), DiscoveryConfig(warm_start=20), "prob_diff")
    assert (c.metric, c.warm_start_metric, c.warm_start) == ("kl", "prob_diff", 20)  # KL has no gradient
    c = resolve_config(get_algorithm("greedy"), DiscoveryConfig(topk_fraction=0.4), "logit_diff")
    assert (c.warm_start_fraction, c.topk_fraction, c.warm_start_metric) == (0.4, None, "logit_diff")
    assert c.warm_start_size(110) == 44


def test_edge_methods_refused_from_architecture_facts():
    from circuits.models import ModelFacts

    mamba = ModelFacts(name="m", kind="zoo", architecture="MambaForCausalLM", model_type="mamba",
                       family="recurrent", n_layers=2, d_model=64, n_heads=0, n_kv_heads=0, d_head=0, d_mlp=0,
                       d_vocab=10, n_ctx=None, tied_embeddings=False)
    with pytest.raises(ValueError, match="mamba: recurrent/state-space blocks have no per-component edges"):
        resolve_config(get_algorithm("acdc"), DiscoveryConfig(), "logit_diff", facts=mamba)
    assert resolve_config(get_algorithm("node-patch"), DiscoveryConfig(), "logit_diff", facts=mamba).level == "node"
    gqa = ModelFacts(name="s", kind="pretrained", architecture="LlamaForCausalLM", model_type="llama",
                     family="transformer", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64,
                     d_mlp=1536, d_vocab=49152, n_ctx=8192, tied_embeddings=True)
    assert resolve_config(get_algorithm("eap"), DiscoveryConfig(), "logit_diff", facts=gqa).level == "edge"
    # the graph's own reason is named (not a guess about recurrent blocks)
    with pytest.raises(ValueError, match="parallel attention"):
        resolve_config(get_algorithm("eap"), DiscoveryConfig(), "logit_diff",
                       graph=G((), (), supports_edges=False, meta={"edge_reason": "parallel attention/MLP"}))


# ----------------------------------------------------------------------------------- rankings
def test_result_ranking_is_validated_and_round_trips():
    from circuits.algorithms import DiscoveryResult
    from patching.scores import Scores

    class _Graph:
        def to_dict(self):
            return {}

    scores = Scores(graph=_Graph(), level="edge", values=torch.tensor([0.5, -2.0, float("nan")]),
                    ids=("a", "b", "c"), method="x", ablation="zero", metric="kl", forward_passes=1, seconds=0.0)
    kept = torch.tensor([True, False, False])
    plain = DiscoveryResult(scores, kept, "edge", "eap", 1, 0, 0.0)
    assert plain.importance().tolist() == [0.5, 2.0, -math.inf]  # |score|, NaN last
    ranked = DiscoveryResult(scores, kept, "edge", "greedy", 1, 0, 0.0, ranking=torch.tensor([2.0, 1.0, -math.inf]),
                             ranking_kind="removal-order")
    assert ranked.importance().tolist() == [2.0, 1.0, -math.inf]
    back = DiscoveryResult.from_dict(json.loads(json.dumps(ranked.to_dict())), graph=_Graph())
    assert back.ranking_kind == "removal-order" and back.importance().tolist() == [2.0, 1.0, -math.inf]
    with pytest.raises(ValueError, match="ranking_kind"):
        DiscoveryResult(scores, kept, "edge", "x", 1, 0, 0.0, ranking=torch.zeros(3), ranking_kind="vibes")
    with pytest.raises(ValueError, match="together"):
        DiscoveryResult(scores, kept, "edge", "x", 1, 0, 0.0, ranking=torch.zeros(3))


def test_connected_prefixes_equal_the_longest_prefix_by_brute_force():
    """Oracle: try every prefix length m of the |score| ranking with prune_to_connected and keep the largest
    whose connected part has at most k edges."""
    from circuits.algorithms.select import connected_prefixes

    g = two_layer_graph(heads=2)
    for seed in range(3):
        s = torch.randn(len(g.edges), generator=torch.Generator().manual_seed(seed))
        order = torch.sort(s.abs(), descending=True, stable=True).indices
        prefixes = []
        for m in range(len(g.edges) + 1):
            mask = torch.zeros(len(g.edges), dtype=torch.bool)
            mask[order[:m]] = True
            prefixes.append(prune_to_connected(g, mask))
        counts = [0, 1, 3, 8, 20, len(g.edges)]
        got = connected_prefixes(g, s.abs(), counts)
        for i, k in enumerate(counts):
            want = [p for p in prefixes if int(p.sum()) <= k][-1]
            assert torch.equal(got[i], want) and torch.equal(top_connected(g, s, k), want), (seed, k)


def test_acdc_resume_with_a_warm_start_gives_the_same_result(tmp_path):
    g = two_layer_graph(heads=2)
    removed0 = torch.rand(len(g.edges), generator=torch.Generator().manual_seed(9)) < 0.4
    ckpt = tmp_path / "state.json"
    cfg = DiscoveryConfig(threshold=0.05, window=2, checkpoint=str(ckpt), resume=True)
    full_kept, full_effect, _, _ = run_acdc(QuadraticPatcher(len(g.edges), 4, 0.05), g,
                                            DiscoveryConfig(threshold=0.05, window=2), removed=removed0)
    with pytest.raises(KeyboardInterrupt):
        run_acdc(QuadraticPatcher(len(g.edges), 4, 0.05, fail_after=8), g, cfg, fingerprint="w", removed=removed0)
    saved = json.loads(ckpt.read_text())
    assert (saved["next_receiver"], saved["next_edge"]) != (0, 0) and saved["next_receiver"] < len(acdc_receivers(g))
    kept, effect, _, _ = run_acdc(QuadraticPatcher(len(g.edges), 4, 0.05), g, cfg, fingerprint="w", removed=removed0)
    assert torch.equal(kept, full_kept)
    both = ~torch.isnan(full_effect)
    assert torch.equal(both, ~torch.isnan(effect)) and torch.allclose(effect[both], full_effect[both])
