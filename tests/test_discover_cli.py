"""``circuitexplain discover`` through the real CLI entry point (circuits.cli.main)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from circuits.cli import main
from circuits.cli_discover import parse_topk
from graphs.circuit import edge_ids, load


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parse_topk():
    assert parse_topk("20") == (20, None)
    assert parse_topk("5%") == (None, 0.05)
    assert parse_topk("100%") == (None, 1.0)
    for bad in ("0", "-3", "0%", "150%", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--topk"):
            parse_topk(bad)


@pytest.mark.parametrize("method,extra", [("eap", ["--topk", "6"]), ("acdc", ["--threshold", "0.02"])])
def test_cli_json_summary_matches_the_saved_graph(tmp_path, capsys, method, extra):
    out = tmp_path / "c.json"
    rc = main(["discover", "--model", "attn2l-induction", "--task", "induction", "--method", method, "-n", "8",
               "--device", "cpu", "--no-progress", "--out", str(out), "--json", *extra])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert {"nodes", "edges", "faithfulness", "seconds", "forward_passes"} <= set(s)
    G = load(out)
    assert s["edges"] == len(edge_ids(G)) and s["edges_total"] == len(edge_ids(G, in_circuit_only=False))
    assert s["nodes"] == sum(1 for _, d in G.nodes(data=True) if d["in_circuit"])
    assert s["faithfulness"] == G.graph["faithfulness"] and s["forward_passes"] == G.graph["forward_passes"] > 0
    if method == "eap":
        assert s["edges"] <= 6  # top 6, minus edges not on an input -> logits path
    assert G.graph["method"] == method and json.loads(G.graph["config"])["n_prompts"] == 8
    assert not (tmp_path / "c.json.ckpt.json").exists()  # the ACDC checkpoint is removed when done


def test_cli_text_summary(tmp_path, capsys):
    out = tmp_path / "n.json"
    rc = main(["discover", "--model", "attn2l-induction", "--task", "induction", "--method", "node-atp",
               "--level", "node", "--topk", "50%", "-n", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "node-atp on attn2l-induction" in text and "forward passes" in text and str(out) in text


@pytest.mark.parametrize("argv,msg", [
    (["--method", "acdc", "--topk", "5"], "threshold"),
    (["--method", "eap", "--level", "neuron"], "level"),
    (["--method", "eap", "--resume"], "acdc only"),
    (["--method", "eap", "--task", "no_such_task"], "unknown task"),
])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, argv, msg):
    base = {"--model": "attn2l-induction", "--task": "induction", "--out": str(tmp_path / "x.json")}
    args = ["discover", "-n", "4", "--device", "cpu", "--no-progress", *argv]
    for k, v in base.items():
        if k not in argv:
            args += [k, v]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("circuitexplain: error:") and msg in err[0], err  # before loading


def test_cli_edge_method_on_mamba_is_one_line_error(tmp_path, capsys):
    rc = main(["discover", "--model", "ioi-mamba", "--task", "ioi", "--method", "eap", "-n", "4", "--device", "cpu",
               "--out", str(tmp_path / "m.json")])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("circuitexplain: error:") and "node method" in last and "node-patch" in last
    assert "mamba: recurrent/state-space" in last  # the real reason, from the config
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--model", "ioi-mamba", "--method", "acdc"], "recurrent/state-space blocks have no per-component edges"),
    (["--method", "eap", "--metric", "kl"], "metric 'kl' only at the clean run, where it is exactly zero"),
    (["--method", "node-atp", "--metric", "accuracy"], "'accuracy' is not differentiable"),
    (["--method", "greedy", "--threshold", "0.1"], "--threshold does not apply"),
    (["--method", "greedy", "--metric", "accuracy", "--topk", "10"], "greedy (its EAP-IG warm start)"),
    (["--method", "eap-ig", "--warm-start", "10"], "takes no warm start"),
    (["--method", "node-patch", "--qk-fix"], "--qk-fix applies to the edge attribution methods"),
])
def test_inapplicable_requests_fail_before_weights_load(tmp_path, capsys, monkeypatch, argv, msg):
    """Decided from the arguments and the model's config: loading weights would be an error here."""
    import circuits.models

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded for a request that cannot run")

    monkeypatch.setattr(circuits.models, "load_model", no_weights)
    args = ["discover", "--task", "ioi", "-n", "4", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "x.json"), *argv]
    if "--model" not in argv:
        args += ["--model", "ioi-2l"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("circuitexplain: error:") and msg in err[0], err


def test_cli_held_out_prompts_and_engine_options(tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["discover", "--model", "ioi-2l", "--task", "ioi", "--method", "eap-ig", "--topk", "30", "-n", "16",
               "--eval-prompts", "16", "--prompt-batch", "5", "--device", "cpu", "--no-progress", "--out", str(out),
               "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    G = load(out)
    assert s["eval_prompts"] == 16 and G.graph["n_prompts"] == 16
    assert s["heldout_faithfulness"] == G.graph["heldout_faithfulness"] and s["ranking"] == "abs-score"
    assert s["heldout_faithfulness"] != s["faithfulness"]
    assert "generator:ioi" in G.graph["task_source"] and "train 16 of 32" in G.graph["task_source"]


def test_acdc_ctrl_c_then_resume_gives_the_uninterrupted_graph(tmp_path, capsys, monkeypatch):
    import patching.exact

    base = ["discover", "--model", "ioi-2l", "--task", "ioi", "--method", "acdc", "-n", "8", "--device", "cpu",
            "--no-progress", "--json"]
    assert main([*base, "--out", str(tmp_path / "full.json")]) == 0

    class Interrupted(patching.exact.EdgePatcher):
        calls = 0

        def run(self, ablate):
            Interrupted.calls += 1
            if Interrupted.calls > 12:
                raise KeyboardInterrupt
            return super().run(ablate)

    out = tmp_path / "c.json"
    with monkeypatch.context() as m:
        m.setattr(patching.exact, "EdgePatcher", Interrupted)
        assert main([*base, "--out", str(out)]) == 130
    ckpt = tmp_path / "c.json.ckpt.json"
    state = json.loads(ckpt.read_text())
    assert state["next_receiver"] > 0 and not out.exists()
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--resume"]) == 0
    assert not ckpt.exists()
    full, resumed = load(tmp_path / "full.json"), load(out)
    assert set(edge_ids(resumed)) == set(edge_ids(full))
    for u, v, d in full.edges(data=True):  # same effect sizes (batched forwards may round differently)
        r = resumed.edges[u, v]
        assert {k: x for k, x in r.items() if "score" not in k} == {k: x for k, x in d.items() if "score" not in k}
        assert all(r[k] == pytest.approx(x, abs=1e-4) for k, x in d.items() if "score" in k)
    assert resumed.graph["forward_passes"] > full.graph["forward_passes"]  # the interrupted work counts too
