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
