"""tracr-compiled models: the bridge reproduces tracr exactly, and their reference circuits are exact.

Needs the optional extra ``circuitexplain[tracr]``. Without it these tests skip locally, but fail when the
``CI`` environment variable is set (CI installs the extra, so a missing tracr is a broken environment).
"""


import pytest
import torch

pytestmark = [pytest.mark.tracr, pytest.mark.usefixtures("need_tracr")]



PROGRAMS = ("tracr-reverse", "tracr-frac_prevs")


@pytest.fixture(scope="module")
def models():
    from evals.tracr_models import load_tracr_model

    return {name: load_tracr_model(name) for name in PROGRAMS}


@pytest.mark.parametrize("name,n_inputs", [("tracr-reverse", 3 + 9 + 27 + 81 + 243), ("tracr-frac_prevs", 62)])
def test_bridge_equals_tracr_on_every_input(name, n_inputs):
    from evals.tracr_models import verify_against_tracr

    stats = verify_against_tracr(name)
    assert stats["inputs"] == n_inputs  # every input of length 1..5
    assert stats["mismatches"] == 0
    assert stats["max_residual_diff"] < 1e-6
    assert stats["max_output_diff"] < 1e-6


def test_compile_cache_roundtrip(tmp_path, monkeypatch):
    from evals import tracr_models as tm

    first = tm.compile_tracr("frac_prevs", cache=tmp_path)
    assert list(tmp_path.glob("frac_prevs-*.npz"))

    def boom(program):
        raise AssertionError("recompiled although the cache holds the program")

    monkeypatch.setattr(tm, "compile_assembled", boom)
    again = tm.compile_tracr("tracr-frac_prevs", cache=tmp_path)
    assert again.residual_labels == first.residual_labels
    assert set(again.weights) == set(first.weights)
    assert all((again.weights[k] == first.weights[k]).all() for k in first.weights)


def test_unknown_program():
    from evals.tracr_models import get_program

    with pytest.raises(ValueError, match="unknown tracr program 'tracr-sort'"):
        get_program("tracr-sort")


def _writer(model, label_prefix):
    from evals.tracr_circuits import component_roles

    found = [c for c, role in component_roles(model).items() if label_prefix in role.split(",")]
    assert len(found) == 1, (label_prefix, component_roles(model))
    return found[0]


def test_task_metric_follows_program_semantics(models):
    from evals.tracr_circuits import expected_metric, tracr_task
    from patching.metrics import gather_pos, logit_diff

    for name, model in models.items():
        task = tracr_task(name, n=24, seed=3)
        batch = task.batch(model.tokenizer)
        with torch.no_grad():
            clean = logit_diff(gather_pos(model(batch.clean), batch.pos), batch)
            corrupt = logit_diff(gather_pos(model(batch.corrupt), batch.pos), batch)
        assert torch.allclose(clean, expected_metric(name, task), atol=1e-5)
        if name == "tracr-reverse":  # the corrupted first token is the wrong answer
            assert torch.allclose(corrupt, -torch.ones(len(task)), atol=1e-5)
        else:  # at least one x turned into y: a strictly smaller fraction
            assert bool((corrupt < clean - 0.1).all())


def test_reference_circuits_are_the_programs_mechanism(models):
    from evals.tracr_circuits import tracr_reference, tracr_task
    from patching.graph import ComponentGraph

    rev = models["tracr-reverse"]
    graph = ComponentGraph.from_model(rev)
    head = _writer(rev, rev.tracr.output_label)  # the Aggregate head of `reverse`
    task_ref = tracr_reference(rev, graph, batch=tracr_task("reverse", 16).batch(rev.tokenizer))
    # same-length prompts differ only in a token: only the value path of the reverse head carries it
    assert set(task_ref.edges) == {f"embed->{head}<v>", f"{head}->logits"}
    program_ref = tracr_reference(rev, graph)
    length_mlp = _writer(rev, next(lab.split(":")[0] for lab in rev.tracr.residual_labels
                                   if lab.startswith("length")))
    assert f"pos_embed->{head}<k>" in program_ref.edges  # Select(indices, opp_idx): keys are the indices
    assert any(e.startswith(f"{length_mlp}->") for e in program_ref.edges)  # the length path
    assert set(task_ref.edges) < set(program_ref.edges)

    fp = models["tracr-frac_prevs"]
    graph = ComponentGraph.from_model(fp)
    head = _writer(fp, fp.tracr.output_label)
    mlp = _writer(fp, next(lab for lab in fp.tracr.residual_labels if lab.startswith("map_")))
    ref = tracr_reference(fp, graph, batch=tracr_task("frac_prevs", 16).batch(fp.tokenizer))
    # numerical(tokens == "x") is an MLP, its mean over positions <= q is the head's value path
    assert set(ref.edges) == {f"embed->{mlp}", f"{mlp}->{head}<v>", f"{head}->logits"}


def test_reference_is_exactly_faithful_through_the_engine(models):
    from evals.faithfulness import evaluate_masks
    from evals.tracr_circuits import tracr_reference, tracr_task
    from patching.exact import EdgePatcher
    from patching.graph import ComponentGraph

    for name, model in models.items():
        graph = ComponentGraph.from_model(model)
        batch = tracr_task(name, 16, seed=1).batch(model.tokenizer)
        ref = tracr_reference(model, graph, batch=batch)
        inside = graph.edge_mask(ref.edges)
        patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
        ev = evaluate_masks(patcher, batch, torch.stack([inside, ~inside]), "logit_diff")
        assert ev["faithfulness"].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
        assert float(ev["kl"][0]) == pytest.approx(0.0, abs=1e-6)
        # dropping any single reference edge loses the whole effect (every edge is necessary)
        drops = inside.unsqueeze(0).repeat(len(ref.edges), 1)
        for i, e in enumerate(ref.edges):
            drops[i, graph.edge_index[e]] = False
        assert ev_max(evaluate_masks(patcher, batch, drops, "logit_diff")["faithfulness"]) < 1e-6


def ev_max(t):
    return float(t.abs().max())


def test_edge_forward_reproduces_the_bridge_and_tracr(models):
    """The engine-independent forward over tracr's weights equals the bridge on every input (which equals tracr,
    test above), so it can serve as the reference circuit's oracle."""
    from evals.tracr_circuits import edge_forward
    from evals.tracr_models import BOS, all_inputs, bridge_vocab

    for model in models.values():
        vocab = {t: i for i, t in enumerate(bridge_vocab(model.tracr))}
        for n in range(1, model.tracr.program.max_seq_len + 1):
            toks = torch.tensor([[vocab[BOS]] + [vocab[t] for t in s]
                                 for s in all_inputs(model.tracr.program, range(n, n + 1))])
            with torch.no_grad():
                bridge = model(toks).double()
            assert float((edge_forward(model.tracr, toks) - bridge).abs().max()) < 1e-5


def test_program_circuits_are_conmy_et_als_ground_truth(models):
    """Recomputed from the compiled weights, the zero-ablation program circuits are the edge sets Conmy et al.
    publish: reverse exactly; frac_prevs without their two BOS-fallback edges, which no well-formed input
    (BOS first, as tracr's compiler requires) can move; their proportion data encodes w, x, y, z as token ids
    0-3, which in tracr's input encoding are BOS, compiler_pad, x, y: BOS tokens anywhere, where the fallback
    does matter (shown here with the same forward)."""
    import itertools

    from evals.tracr_circuits import CONMY_EDGES, edge_forward, tracr_reference
    from evals.tracr_models import BOS, PAD, bridge_vocab
    from patching.graph import ComponentGraph

    rev = models["tracr-reverse"]
    ref = tracr_reference(rev, ComponentGraph.from_model(rev), kind="program")
    assert set(ref.edges) == set(CONMY_EDGES["reverse"])
    fp = models["tracr-frac_prevs"]
    ref = tracr_reference(fp, ComponentGraph.from_model(fp), kind="program")
    fallback = {"embed->a1.h0<q>", "embed->a1.h0<k>"}
    assert set(ref.edges) == set(CONMY_EDGES["frac_prevs"]) - fallback
    assert set(ref.details["dropped_inert"].split()) == fallback
    vocab = {t: i for i, t in enumerate(bridge_vocab(fp.tracr))}
    theirs = torch.tensor([[vocab[t] for t in s] for s in itertools.product([BOS, PAD, "x", "y"], repeat=4)])
    clean = edge_forward(fp.tracr, theirs)
    for e in fallback:
        assert float((edge_forward(fp.tracr, theirs, {e}) - clean)[:, 1:].abs().max()) > 0.5, e


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_circuit_is_exact_and_minimal_under_zero_ablation(models, name):
    """Through the engine, at every output position: the program circuit alone (every other edge zero-ablated)
    reproduces the model exactly (l2 distance 0, f = 1 on the task metric), and each of its edges moves the
    output of some input of the program's domain (edge_forward)."""
    from evals.faithfulness import evaluate_masks
    from evals.tracr_circuits import edge_forward, tracr_batch, tracr_reference, tracr_task
    from evals.tracr_models import BOS, all_inputs, bridge_vocab
    from patching.exact import EdgePatcher
    from patching.graph import ComponentGraph

    model = models[name]
    graph = ComponentGraph.from_model(model)
    ref = tracr_reference(model, graph, kind="program")
    batch = tracr_batch(tracr_task(name, 12, seed=2), model, "all")
    inside = graph.edge_mask(ref.edges)
    patcher = EdgePatcher(model, graph, batch, ablation="zero", metric="l2")
    assert float(patcher.run(~inside[None]).abs().max()) < 1e-8
    assert float(patcher.ablated_metric.mean()) > 0.1  # zero-ablating everything does move the output
    ev = evaluate_masks(EdgePatcher(model, graph, batch, ablation="zero", metric="logit_diff"), batch,
                        inside[None], "logit_diff")
    assert float(ev["faithfulness"][0]) == pytest.approx(1.0, abs=1e-6)
    vocab = {t: i for i, t in enumerate(bridge_vocab(model.tracr))}
    toks = [torch.tensor([[vocab[BOS]] + [vocab[t] for t in s] for s in all_inputs(model.tracr.program, range(n, n + 1))])
            for n in range(1, 6)]
    for e in ref.edges:
        assert any(float((edge_forward(model.tracr, t, {e}) - edge_forward(model.tracr, t))[:, 1:].abs().max()) > 1e-3
                   for t in toks), e


def test_all_positions_batch_follows_program_semantics(models):
    from evals.tracr_circuits import TASK_LENGTH, program_outputs, tracr_batch, tracr_task
    from patching.metrics import gather_pos, logit_diff

    for name, model in models.items():
        task = tracr_task(name, n=6, seed=4)
        batch = tracr_batch(task, model, "all")
        n = TASK_LENGTH[name[len("tracr-"):]]
        assert len(batch) == 6 * n and batch.pos.tolist() == list(range(1, n + 1)) * 6
        with torch.no_grad():
            got = logit_diff(gather_pos(model(batch.clean), batch.pos), batch)
        if name == "tracr-reverse":
            assert torch.allclose(got, torch.ones(len(batch)), atol=1e-5)  # answer = the mirrored token
            answers = [model.tokenizer.convert_ids_to_tokens(int(a)) for a in batch.answer]
            assert answers == [t for p in task.pairs for t in program_outputs(name, p.clean.split())]
        else:
            want = torch.tensor([v for p in task.pairs for v in program_outputs(name, p.clean.split())])
            assert torch.allclose(got, want.float(), atol=1e-5)
    last = tracr_batch(tracr_task("reverse", n=3), models["tracr-reverse"], "last")
    assert last.pos.tolist() == [3, 3, 3]


def test_reference_follows_the_ablation(models):
    from evals.references import reference_for
    from evals.tracr_circuits import tracr_task
    from patching.graph import ComponentGraph

    model = models["tracr-reverse"]
    graph = ComponentGraph.from_model(model)
    batch = tracr_task("reverse", 8).batch(model.tokenizer)
    zero = reference_for("tracr-reverse", model, graph, batch, ablation="zero")
    resample = reference_for("tracr-reverse", model, graph, batch, ablation="resample")
    assert "program circuit" in zero.source and len(zero.edges) == 11
    assert "task circuit" in resample.source and len(resample.edges) == 2
    assert reference_for("tracr-reverse", model, graph, batch, ablation="zero", kind="task").edges == resample.edges
