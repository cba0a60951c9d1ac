"""Feature circuits end to end: `circuitexplain discover --level feature` on ioi-2l with SAE directories, the
saved graph through graphs (load, prune, every export), refusals before the weights load, conversion."""

import json

import pytest
import torch

from circuits.cli import main
from explainers.sae.io import save_sae
from explainers.sae.model import SAE, SAEConfig
from graphs.circuit import load, validate

R0, M1 = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"


def rand_sae(hook, d=128, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=n, arch="relu-l1", centring="learned", hook=hook, model="ioi-2l"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1 - 0.2)
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    d = tmp_path_factory.mktemp("saes")
    return str(save_sae(rand_sae(R0), d / "r0")), str(save_sae(rand_sae(M1, seed=1), d / "m1"))


def discover(tmp_path, saes, method, *extra):
    out = tmp_path / f"{method}.json"
    rc = main(["discover", "--model", "ioi-2l", "--task", "ioi", "--level", "feature", "--sae", ",".join(saes),
               "--method", method, "--max-features-per-site", "12", "-n", "12", "--no-progress", "--json",
               "--out", str(out), *extra])
    assert rc == 0
    return load(out)


def test_edge_circuit_round_trips_through_graphs_and_every_export(tmp_path, saes, capsys):
    from graphs.export import EXPORTERS
    from graphs.ops import prune

    G = discover(tmp_path, saes, "eap-ig", "--topk", "20")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["level"] == "feature-edge" and summary["units_kept"] == 20
    assert G.graph["level"] == "feature-edge" and G.graph["sites"] == f"{R0},{M1}"
    assert G.graph["saes"] == "r0,m1"
    kinds = {d["kind"] for _, d in G.nodes(data=True)}
    assert kinds == {"feature", "error", "logits"}
    err = G.nodes["err@0.resid_post"]
    assert (err["kind"], err["layer"], err["hook"], err["sae"], err["site"]) == ("error", 0, R0, "r0", "0.resid_post")
    assert all(d["sae"] == "m1" for n, d in G.nodes(data=True) if n.endswith("@1.mlp_out"))
    assert G.graph["faithfulness"] == pytest.approx(G.graph["logit_diff_recovered"])  # task metric is logit_diff
    validate(G)
    P = prune(G)  # level feature-edge prunes edges: the kept, connected circuit
    assert 0 < P.number_of_edges() <= 20 and "logits" in P
    for name, fn in EXPORTERS.items():
        path = fn(G, tmp_path / f"g.{name}")
        assert path.stat().st_size > 100, name


def test_node_circuit_keeps_the_top_units_and_is_measured(tmp_path, saes, zoo_model):
    from circuits.discover import make_task
    from explainers.bases.features import FeatureBasis
    from patching.faithfulness import faithfulness
    from patching.features import FeatureGraph, FeaturePatcher, feature_node_scores

    G = discover(tmp_path, saes, "node-patch", "--topk", "5", "--ablation", "mean")
    assert G.graph["level"] == "feature"
    # recompute with the library directly: the same candidates, scores and top 5
    model = zoo_model("ioi-2l")
    bases = {b.hook: b for b in (FeatureBasis.load(s) for s in saes)}
    batch = make_task("ioi", 12, 0, model).batch(model.tokenizer)
    fg = FeatureGraph.build(model, bases, batch, max_features_per_site=12)
    sc = feature_node_scores(model, fg, batch, method="patch", ablation="mean")
    assert sorted(n for n, d in G.nodes(data=True) if "score" in d) == sorted(fg.ids[:-1])
    for n, v in sc.as_dict().items():
        if n != "logits":
            assert G.nodes[n]["score"] == pytest.approx(v, abs=1e-6)
    top = {fg.ids[i] for i in torch.argsort(sc.values[:-1].abs(), descending=True, stable=True)[:5].tolist()}
    assert {n for n, d in G.nodes(data=True) if d["in_circuit"]} == top | {"logits"}
    pt = FeaturePatcher(model, fg, batch, ablation="mean")
    m = pt.run((pt.ablatable & ~fg.node_mask(top))[None]).mean()
    f = faithfulness(float(m), float(pt.clean_metric.mean()), float(pt.ablated_metric.mean()))
    assert G.graph["faithfulness"] == pytest.approx(f, abs=1e-5)


def test_target_selection_reaches_the_target_and_is_measured_held_out(tmp_path, saes):
    G = discover(tmp_path, saes, "node-ig", "--target", "0.6", "--ig-steps", "2", "--eval-prompts", "6")
    assert G.graph["method"] == "node-ig" and G.graph["stat_budget_reached"] == 1
    assert G.graph["faithfulness"] >= 0.6 and G.graph["n_prompts"] == 12 and G.graph["eval_prompts"] == 6
    assert "heldout_faithfulness" in G.graph and G.graph["heldout_metric_full"] != G.graph["metric_full"]


@pytest.mark.parametrize("args,message", [
    (["--method", "acdc"], "method 'acdc' does not apply to feature circuits"),
    (["--method", "eap", "--metric", "accuracy"], "accuracy"),
    (["--method", "eap"], "no such directory"),
    (["--method", "eap", "--warm-start", "10"], "--warm-start does not apply to --level feature"),
])
def test_refusals_before_the_weights_load(tmp_path, saes, monkeypatch, capsys, args, message):
    import circuits.models

    monkeypatch.setattr(circuits.models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    sae = str(tmp_path / "missing") if "no such" in message else saes[0]
    rc = main(["discover", "--model", "ioi-2l", "--task", "ioi", "--level", "feature", "--sae", sae,
               "--out", str(tmp_path / "x.json"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_sae_sites_checked_against_the_model_config(tmp_path, monkeypatch, capsys):
    import circuits.models

    monkeypatch.setattr(circuits.models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    bad_layer = save_sae(rand_sae("blocks.5.hook_resid_post"), tmp_path / "l5")
    bad_width = save_sae(rand_sae(R0, d=64), tmp_path / "w64")
    twice_a = save_sae(rand_sae(R0), tmp_path / "a")
    twice_b = save_sae(rand_sae(R0, seed=2), tmp_path / "b")
    for sae, message in ((bad_layer, "hook blocks.5.hook_resid_post is absent from ioi-2l (2 layers)"),
                         (bad_width, "d_in=64 but blocks.0.hook_resid_post of ioi-2l has width 128"),
                         (f"{twice_a},{twice_b}", "a second SAE for hook blocks.0.hook_resid_post")):
        rc = main(["discover", "--model", "ioi-2l", "--task", "ioi", "--level", "feature", "--sae", str(sae),
                   "--method", "eap", "--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err, err
    rc = main(["discover", "--model", "ioi-2l", "--task", "ioi", "--sae", str(twice_a), "--method", "eap",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "--sae applies to --level feature only" in capsys.readouterr().err
