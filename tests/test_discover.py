"""discover() on zoo models against known mechanisms, and ACDC against plain sequential ACDC.

Oracles:
- attn2l-induction: the previous-token head and the induction head(s) are identified from the model's
  attention patterns here (Olsson et al. 2022's scores), not hard-coded; every edge method must keep
  prev-token head -> induction head through the KEY input and induction head -> logits; the node
  methods must keep both heads.
- ioi-2l: the kept circuit, re-measured from the saved graph file with the engine, recovers >= 80 % of the
  logit difference with at most the fraction of edges each method is measured to need (IOI_RUNS); greedy
  pruning with <= 20 % of the edges.
- ACDC equals sequential ACDC written out in this file (one engine call per tried edge).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_graphs import comparable

from circuits.algorithms import DiscoveryConfig
from circuits.algorithms.acdc import run_acdc
from circuits.algorithms.order import acdc_receivers
from circuits.discover import build_graph, discover
from circuits.tasks import get_task
from circuits.tasks.base import encode
from circuits.tasks.vocab import INDUCTION_WORDS
from graphs.circuit import edge_ids, load, node_ids, save

EDGE_METHODS = ("acdc", "eap", "eap-ig")
NODE_METHODS = ("node-patch", "node-atp")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def induction_model():
    from circuits.models import load_model

    return load_model("attn2l-induction", device="cpu")


@pytest.fixture(scope="module")
def ioi_model():
    from circuits.models import load_model

    return load_model("ioi-2l", device="cpu")


@pytest.fixture(scope="module")
def induction_heads(induction_model):
    """(previous-token head of layer 0, induction heads of layer 1 by score), from attention patterns on
    BOS + R + R with R 20 distinct random words."""
    model = induction_model
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(7)
    vocab = torch.tensor([encode(tok, " " + w, prepend_bos=False)[0] for w in INDUCTION_WORDS])
    rows = []
    for _ in range(16):
        r = vocab[torch.randperm(len(vocab), generator=gen)[:20]]
        rows.append(torch.cat([torch.tensor([tok.bos_token_id]), r, r]))
    tokens = torch.stack(rows)
    n = 20
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    p0 = cache["blocks.0.attn.hook_pattern"]  # [B, H, Q, K]
    p1 = cache["blocks.1.attn.hook_pattern"]
    q = torch.arange(1, tokens.shape[1])
    prev = p0[:, :, q, q - 1].mean((0, 2))
    q2 = torch.arange(n + 1, 2 * n + 1)  # second-copy positions; the earlier copy's successor is q2 - n + 1
    ind = p1[:, :, q2[:-1], q2[:-1] - n + 1].mean((0, 2))
    prev_head = int(prev.argmax())
    assert prev[prev_head] > 0.5, f"no previous-token head: scores {prev.tolist()}"
    heads = [int(h) for h in torch.argsort(ind, descending=True) if ind[h] > 0.3]
    assert heads, f"no induction head: scores {ind.tolist()}"
    return prev_head, heads


def induction_task(n=16):
    return get_task("induction", n=n, seed=1)


# attn2l-induction has 29 edges. Its attention is sharp (induction scores ~0.9), which saturates the
# softmax: gradients through the induction heads' keys are small, so EAP / EAP-IG rank the K-composition
# edges lower than exact patching does (AtP*, Kramar et al. 2024). They run with their default size: the
# smallest top-k whose circuit reaches 80 % faithfulness.
INDUCTION_RUNS = {"acdc": DiscoveryConfig(seed=1), "eap": DiscoveryConfig(seed=1), "eap-ig": DiscoveryConfig(seed=1)}


@pytest.mark.parametrize("method", EDGE_METHODS)
def test_edge_methods_find_the_induction_circuit(induction_model, induction_heads, method):
    prev, heads = induction_heads
    G = discover(induction_model, induction_task(), method, INDUCTION_RUNS[method])
    kept = set(edge_ids(G))
    assert any(f"a0.h{prev}->a1.h{h}<k>" in kept for h in heads), sorted(kept)  # K-composition
    for h in heads:
        assert f"a1.h{h}->logits" in kept, sorted(kept)
    # a strict subset of the graph that carries the behaviour
    assert len(kept) < len(edge_ids(G, in_circuit_only=False))
    assert G.graph["logit_diff_recovered"] > 0.5


@pytest.mark.parametrize("method", NODE_METHODS)
def test_node_methods_find_the_induction_heads(induction_model, induction_heads, method):
    prev, heads = induction_heads
    G = discover(induction_model, induction_task(), method, DiscoveryConfig(level="node", topk=1 + len(heads)))
    # the previous-token head and the strongest induction head are among the 1 + len(heads) kept heads
    assert {f"a0.h{prev}", f"a1.h{heads[0]}"} <= set(node_ids(G)), sorted(node_ids(G))
    if method == "node-patch":  # exact: ablating any of these heads hurts the logit difference
        scores = {n: d["score"] for n, d in G.nodes(data=True) if "score" in d}
        assert all(scores[h] < 0 for h in (f"a0.h{prev}", *(f"a1.h{h}" for h in heads))), scores


# ioi-2l (weight decay 1.0, see its recipe) on these 24 prompts: greedy pruning to the 80 % target from EAP-IG's
# top 44 keeps 20 of 110 edges for 80.6 % (from the full graph: also 20 edges, which keep 78-83 % on held-out prompts).
# ACDC with the logit-difference metric and tau 0.2 keeps 28 edges for 86 %; EAP-IG's top 25 give 82 %.
# (method, config, largest fraction of the 110 edges)
IOI_RUNS = {"acdc": (DiscoveryConfig(metric="logit_diff", threshold=0.2), 0.26),
            "eap-ig": (DiscoveryConfig(topk=25), 0.23),
            "greedy": (DiscoveryConfig(topk=44), 0.2)}


@pytest.mark.parametrize("method", sorted(IOI_RUNS))
def test_regression_ioi_circuit_is_small_and_faithful(ioi_model, method, tmp_path):
    """Regression: the size bounds in IOI_RUNS are the fractions measured on the shipped ioi-2l checkpoint."""
    from patching.exact import EdgePatcher

    task = get_task("ioi", n=24, seed=0)
    config, max_fraction = IOI_RUNS[method]
    G = discover(ioi_model, task, method, config)
    path = save(G, tmp_path / f"{method}.json")
    kept, total = edge_ids(load(path)), edge_ids(load(path), in_circuit_only=False)
    assert len(kept) <= max_fraction * len(total), (len(kept), len(total))
    # re-measure the circuit read back from the file with the engine directly
    graph = build_graph(ioi_model, "edge")
    batch = task.batch(ioi_model.tokenizer, "cpu")
    patcher = EdgePatcher(ioi_model, graph, batch, ablation="resample", metric="logit_diff")
    circuit = ~graph.edge_mask(kept)
    ld_circuit, ld_empty = (float(v) for v in patcher.run(torch.stack([circuit, torch.ones_like(circuit)])).mean(-1))
    ld_full = float(patcher.clean_metric.mean())
    recovered = (ld_circuit - ld_empty) / (ld_full - ld_empty)
    assert recovered >= 0.8, recovered
    assert recovered == pytest.approx(G.graph["logit_diff_recovered"], abs=1e-4)


def test_regression_eap_ig_beats_eap_at_the_same_budget(ioi_model):
    """Hanna et al. 2024: integrated gradients fix EAP's first-order error. Regression: the margin is tuned to the
    shipped ioi-2l checkpoint (at 25 edges: 82 % vs 22 %)."""
    task = get_task("ioi", n=24, seed=0)
    rec = {m: discover(ioi_model, task, m, DiscoveryConfig(topk=25)).graph["logit_diff_recovered"]
           for m in ("eap", "eap-ig")}
    assert rec["eap-ig"] > rec["eap"] + 0.3, rec


def sequential_acdc(patcher, graph, tau):
    """ACDC as in the paper: one forward per tried edge, KL to the clean model, from the output back."""
    removed = torch.zeros(graph.n_edges, dtype=torch.bool)
    cur = float(patcher.clean_metric.double().mean())
    for rec in acdc_receivers(graph):
        if rec.node != "logits" and all(removed[i] for i in graph.outgoing(rec.node)):
            removed[list(rec.edges)] = True
            continue
        for i in rec.edges:
            trial = removed.clone()
            trial[i] = True
            value = float(patcher.run(trial[None])[0].double().mean())
            if value - cur < tau:
                removed, cur = trial, value
    return ~removed


@pytest.mark.parametrize("tau", [0.003, 0.03])
def test_acdc_equals_sequential_acdc_on_a_model(induction_model, tau):
    from patching.exact import EdgePatcher

    graph = build_graph(induction_model, "edge")
    batch = induction_task(n=8).batch(induction_model.tokenizer, "cpu")
    ref = sequential_acdc(EdgePatcher(induction_model, graph, batch, ablation="resample", metric="kl"), graph, tau)
    patcher = EdgePatcher(induction_model, graph, batch, ablation="resample", metric="kl")
    kept, _, stats, _ = run_acdc(patcher, graph, DiscoveryConfig(threshold=tau, metric="kl"))
    assert torch.equal(kept, ref)
    assert 0 < int(kept.sum()) < graph.n_edges
    assert stats["rounds"] < stats["edges_tested"]  # batched: fewer engine calls than tried edges


@pytest.mark.parametrize("method", ["acdc", "eap-ig"])
def test_same_call_twice_gives_the_same_graph(induction_model, method):
    cfg = DiscoveryConfig(seed=3, n_prompts=8)
    a = discover(induction_model, "induction", method, cfg)
    b = discover(induction_model, "induction", method, cfg)
    assert comparable(a) == comparable(b)
    assert a.graph["seed"] == 3 and a.graph["n_prompts"] == 8 and json.loads(a.graph["config"])["seed"] == 3


ZOO_METHOD = {"attn2l-induction": ("eap", "induction"), "ioi-2l": ("acdc", "ioi"),
              "greater-than-2l": ("eap-ig", "greater_than"), "dyck-2l": ("node-patch", "dyck"),
              "ioi-2l-gpt2": ("eap", "ioi"), "ioi-mamba": ("node-patch", "ioi"),
              # the IOI size family of the SAE scale study (circuits/zoo/recipes.py)
              "ioi-2l-d32": ("eap-ig", "ioi"), "ioi-2l-d64": ("acdc", "ioi"), "ioi-3l-d64": ("eap", "ioi"),
              "ioi-4l-d64": ("greedy", "ioi")}


@pytest.mark.parametrize("name", sorted(ZOO_METHOD))
def test_discover_on_every_zoo_model(name):
    from circuits.zoo import RECIPES

    assert set(ZOO_METHOD) == set(RECIPES)
    method, task = ZOO_METHOD[name]
    G = discover(name, task, method, DiscoveryConfig(n_prompts=8), device="cpu")
    assert G.graph["model"] == name and G.graph["method"] == method
    assert 0 < sum(1 for _, d in G.nodes(data=True) if d["in_circuit"]) <= G.number_of_nodes()
    assert "faithfulness" in G.graph and G.graph["forward_passes"] > 0


@pytest.mark.parametrize("method", EDGE_METHODS)
def test_edge_methods_on_mamba_fail_clearly(method):
    with pytest.raises(ValueError, match="node method"):
        discover("ioi-mamba", "ioi", method, DiscoveryConfig(n_prompts=4), device="cpu")


def test_discovery_result_round_trips_through_json(induction_model):
    from circuits.algorithms import ALGORITHMS, DiscoveryResult

    graph = build_graph(induction_model, "edge")
    batch = induction_task(n=4).batch(induction_model.tokenizer, "cpu")
    res = ALGORITHMS["eap"](induction_model, graph, batch, DiscoveryConfig(topk=5, metric="logit_diff"))
    assert int(res.kept.sum()) <= 5 and res.forward_passes > 0 and res.ablations == 0
    back = DiscoveryResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.scores.ids == res.scores.ids and torch.equal(back.kept, res.kept)
    assert torch.allclose(back.scores.values, res.scores.values)
    assert back.to_dict() == res.to_dict()


def test_neuron_level_keeps_the_top_neurons(ioi_model):
    G = discover(ioi_model, get_task("ioi", n=8, seed=2), "node-atp", DiscoveryConfig(level="neuron", topk=10))
    neurons = {n: d for n, d in G.nodes(data=True) if d["kind"] == "neuron"}
    assert len(neurons) == ioi_model.cfg.n_layers * ioi_model.cfg.d_mlp
    kept = {n for n, d in neurons.items() if d["in_circuit"]}
    assert len(kept) == 10 and G.graph["level"] == "neuron"
    cutoff = min(abs(neurons[n]["score"]) for n in kept)
    assert all(abs(d["score"]) <= cutoff for n, d in neurons.items() if n not in kept)
    for layer in range(ioi_model.cfg.n_layers):  # an MLP is in the circuit iff one of its neurons is
        assert G.nodes[f"m{layer}"]["in_circuit"] == any(n.startswith(f"m{layer}.n") for n in kept)
    assert "faithfulness" in G.graph


@pytest.mark.parametrize("method,level", [("eap-ig", "edge"), ("node-patch", "node")])
def test_default_size_is_the_smallest_faithful_candidate(ioi_model, method, level):
    from circuits.algorithms.budget import budgets

    task = get_task("ioi", n=16, seed=4)
    G = discover(ioi_model, task, method, DiscoveryConfig(level=level))
    k, n = G.graph["stat_budget"], G.graph["units"]
    assert G.graph["stat_budget_reached"] == 1 and G.graph["faithfulness"] >= 0.8
    assert G.graph["faithfulness"] == pytest.approx(G.graph["stat_budget_faithfulness"], abs=1e-6)
    grid = budgets(n)
    assert k in grid
    if k != grid[0]:  # the next smaller candidate, measured on its own, falls short of the target
        smaller = discover(ioi_model, task, method, DiscoveryConfig(level=level, topk=grid[grid.index(k) - 1]))
        assert smaller.graph["faithfulness"] < 0.8


def test_split_task_is_seeded_disjoint_and_keeps_duplicates_together():
    from dataclasses import replace

    from circuits.discover import split_task

    task = get_task("ioi", n=30, seed=5)
    task = replace(task, pairs=task.pairs + task.pairs[:4])  # 4 clean prompts twice
    a_train, a_test = split_task(task, 10, seed=1)
    b_train, b_test = split_task(task, 10, seed=1)
    assert a_train.pairs == b_train.pairs and a_test.pairs == b_test.pairs
    assert not {p.clean for p in a_train.pairs} & {p.clean for p in a_test.pairs}
    assert len(a_train) + len(a_test) == len(task) and len(a_test) >= 10
    assert split_task(task, 10, seed=2)[1].pairs != a_test.pairs
    with pytest.raises(ValueError, match="cannot hold out 34"):
        split_task(task, 34, seed=1)


def test_discover_held_out_prompts_are_measured_like_the_discovery_ones(ioi_model):
    """discover(eval_prompts=N): the circuit is found on n prompts and measured again on N others; the held-out
    numbers equal measure_faithfulness on exactly those prompts (split_task of the n + N generated)."""
    from circuits.discover import measure_faithfulness, split_task

    G = discover(ioi_model, "ioi", "eap-ig", DiscoveryConfig(topk=20, n_prompts=16, seed=2), eval_prompts=12)
    assert G.graph["n_prompts"] == 16 and G.graph["eval_prompts"] == 12
    train, test = split_task(get_task("ioi", n=28, seed=2), 12, 2)
    graph = build_graph(ioi_model, "edge")
    from circuits.algorithms import ALGORITHMS, get_algorithm, resolve_config

    cfg = resolve_config(get_algorithm("eap-ig"), DiscoveryConfig(topk=20, seed=2), "logit_diff", graph=graph)
    res = ALGORITHMS["eap-ig"](ioi_model, graph, train.batch(ioi_model.tokenizer), cfg)
    assert set(res.kept_ids) == set(edge_ids(G))  # discovered on the train part only
    held = measure_faithfulness(ioi_model, graph, test.batch(ioi_model.tokenizer), res, ablation="resample",
                                metric="logit_diff")
    assert G.graph["heldout_faithfulness"] == pytest.approx(held["faithfulness"], abs=1e-9)
    assert G.graph["heldout_metric_empty"] == pytest.approx(held["metric_empty"], abs=1e-9)


def test_empty_circuit_is_the_fully_ablated_run_at_every_level(ioi_model):
    """One convention (patching/faithfulness.py): the empty circuit ablates everything, the embeddings included,
    so under resample ablation m(empty) is the model's metric on the corrupted prompts at edge and node level."""
    from patching.metrics import gather_pos, logit_diff

    task = get_task("ioi", n=8, seed=6)
    batch = task.batch(ioi_model.tokenizer, "cpu")
    with torch.no_grad():
        corrupt = float(logit_diff(gather_pos(ioi_model(batch.corrupt), batch.pos), batch).double().mean())
    for method, level in (("eap-ig", "edge"), ("node-patch", "node"), ("node-atp", "neuron")):
        G = discover(ioi_model, task, method, DiscoveryConfig(level=level, topk=3))
        assert G.graph["metric_empty"] == pytest.approx(corrupt, abs=1e-4), (method, level)
