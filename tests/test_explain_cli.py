"""``circuitexplain explain`` end to end, offline (vocab explainer, tokens and embedding scorers): the units chosen,
scores recomputed independently from the saved records (scipy), held-out exemplars' activations recomputed with
fresh forwards of the model, the circuit with explanations attached, resume after a cut line, direction and
feature levels, self-explanation, and refusals before any weights load. The LLM path against a local fake endpoint
(fail, resume, rerun from the cache) is in tests/test_explain_cli_llm.py; against a real vLLM server in
tests/test_vllm_integration.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from circuits.cli import main
from evals.explanation_scores import score_record
from graphs import circuit

MODEL = "ioi-2l"
IN_CIRCUIT = {"a0.h1": 0.5, "a1.h2": 3.0, "a1.h0": 1.0, "m1": 2.0}


def small_circuit(path: Path, model: str = MODEL) -> Path:
    """A hand-made ioi-2l circuit: in-circuit a1.h2 (edge |score| 3), m1 (2), a1.h0 (1), a0.h1 (0.5)."""
    G = circuit.new_circuit(model=model, task="ioi", method="hand", ablation="resample", metric="logit_diff", seed=0)
    circuit.add_component(G, "embed", kind="embed", layer=None, hook="hook_embed")
    for L in range(2):
        for h in range(4):
            circuit.add_component(G, f"a{L}.h{h}", kind="attn_head", layer=L, head=h,
                                  hook=f"blocks.{L}.attn.hook_result", in_circuit=f"a{L}.h{h}" in IN_CIRCUIT)
        circuit.add_component(G, f"m{L}", kind="mlp", layer=L, hook=f"blocks.{L}.hook_mlp_out",
                              in_circuit=f"m{L}" in IN_CIRCUIT)
    circuit.add_component(G, "logits", kind="logits", layer=None, hook="ln_final.hook_in")
    for node, s in IN_CIRCUIT.items():
        circuit.add_connection(G, node, "logits", score=s, in_circuit=True)
    circuit.add_connection(G, "a0.h0", "logits", score=9.0, in_circuit=False)  # outside: never chosen
    circuit.save(G, path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["explain", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "explanations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One offline run shared by the tests below (vocab + tokens + embedding, neuron level, --attach)."""
    tmp = tmp_path_factory.mktemp("explain")
    graph = small_circuit(tmp / "circuit.json")
    out = tmp / "out"
    argv = ["explain", "--model", MODEL, "--graph", str(graph), "--level", "neuron", "--explainer", "vocab",
            "--scorer", "tokens,embedding", "--out", str(out), "--tokens", "3000", "--seq-len", "32", "--window",
            "12", "--per-node", "2", "--attach", "--no-progress"]
    assert main(argv) == 0
    return argv, graph, out


def test_offline_units_scores_and_exemplars(offline_run, zoo_model):
    from explainers.exemplars import StoreIndex, held_out_documents
    from explainers.store import ActivationStore

    _, _, out = offline_run
    m = zoo_model(MODEL)
    lines = lines_of(out)
    store = ActivationStore(out / "store")
    # units: in-circuit nodes by importance; m1's two neurons with the largest E|a| * ||W_out row|| (brute force)
    x = store.read("blocks.1.mlp.hook_post").numpy().astype(np.float64)
    contrib = np.abs(x).mean(0) * m.W_out[1].detach().double().norm(dim=-1).numpy()
    top2 = [f"m1.n{i}" for i in np.argsort(-contrib, kind="stable")[:2]]
    assert [ln["unit"] for ln in lines] == ["a1.h2", *top2, "a1.h0", "a0.h1"]
    assert [ln["node"] for ln in lines] == ["a1.h2", "m1", "m1", "a1.h0", "a0.h1"]
    index = StoreIndex(store)
    seen_docs = set()
    for ln in lines:
        ids = ln["exemplar_ids"]
        assert ids["explainer"] == [] and len(ids["held_out"]) >= 5   # vocab saw no exemplar
        held = ln["exemplars"]["held_out"]
        assert [e["id"] for e in held] == ids["held_out"]
        assert all(held_out_documents(np.array([e["document"]]), 0.3, 0)[0] for e in held)
        assert not {e["document"] for e in held} & {e["document"] for e in ln["exemplars"]["explain"]}
        recs = ln["scorer_records"]
        for name in ("tokens", "embedding"):
            assert ln["scores"][name] == score_record(recs[name])
        # tokens: membership of each held-out token in the explanation's list, Pearson r by scipy
        vocab = {t.strip().casefold() for t in ln["tokens"]}
        pred = [float(t.strip().casefold() in vocab) for e in held for t in e["tokens"]]
        act = [a for e in held for a in e["activations"]]
        assert recs["tokens"]["predicted"] == pred and recs["tokens"]["actual"] == pytest.approx(act)
        want = None if len(set(pred)) < 2 else scipy.stats.pearsonr(pred, act)[0]
        assert ln["scores"]["tokens"] == (None if want is None else pytest.approx(want, abs=1e-9))
        # embedding: labels from the exemplars (max >= half the largest), AUC = Mann-Whitney U / (n1 n0)
        top = max(max(e["activations"]) for e in held)
        labels = [float(max(e["activations"]) >= 0.5 * top) for e in held]
        assert recs["embedding"]["actual"] == labels
        sims = np.array(recs["embedding"]["predicted"])
        pos, neg = sims[np.array(labels) == 1], sims[np.array(labels) == 0]
        want = scipy.stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)) if len(neg) else None
        assert ln["scores"]["embedding"] == (None if want is None else pytest.approx(want))
        # the held-out activations, recomputed by running the model on the stored context
        for e in held[:3]:
            seen_docs.add(e["document"])
            rows = np.flatnonzero((index.row_context == e["context"]) & (index.row_doc_position == e["doc_start"]))
            p0 = int(index.row_position[rows[0]])
            toks = torch.tensor(index.context_tokens(e["context"]), dtype=torch.long)[None]
            hook = "blocks.{}.attn.hook_z" if ln["unit"].startswith("a") else "blocks.{}.mlp.hook_post"
            L = int(ln["unit"][1])
            _, cache = m.run_with_cache(toks, names_filter=[hook.format(L)])
            a = cache[hook.format(L)][0, p0:p0 + len(e["tokens"])]
            if ln["unit"].startswith("a"):
                h = int(ln["unit"].split(".h")[1])
                a = (a[:, h] @ m.W_O[L, h]).norm(dim=-1)
            else:
                a = a[:, int(ln["unit"].split(".n")[1])]
            assert np.allclose(a.detach().numpy(), e["activations"], atol=1e-5)
            assert e["token_ids"] == toks[0, p0:p0 + len(e["tokens"])].tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units"] == 5 and summary["llm_requests"] == 0


def test_offline_attach_puts_explanations_on_the_circuit(offline_run):
    _, graph, out = offline_run
    G = circuit.load(out / "circuit-explained.json")   # validates the schema (scalars, one type per attribute)
    lines = {ln["unit"]: ln for ln in lines_of(out)}
    assert G.nodes["a1.h2"]["explanation"] == lines["a1.h2"]["explanation"]
    assert G.nodes["a1.h2"]["explanation_unit"] == "a1.h2"
    m1 = [u for u in lines if u.startswith("m1.")]
    best = max(m1, key=lambda u: -1 if lines[u]["scores"]["tokens"] is None else lines[u]["scores"]["tokens"])
    assert G.nodes["m1"]["explanation_unit"] == best
    assert G.nodes["m1"]["explanation"] == f"{best}: {lines[best]['explanation']}"
    assert all(u in G.nodes["m1"]["explanations"] for u in m1)
    assert "explanation" not in G.nodes["a0.h0"] and "explanation" not in G.nodes["m0"]
    assert set(G.nodes) == set(circuit.load(graph).nodes)


def test_offline_resume_after_a_cut_line(offline_run, capsys):
    argv, _, out = offline_run
    path = out / "explanations.jsonl"
    original = path.read_bytes()
    lines = original.split(b"\n")[:-1]
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2])  # crash mid-line
    assert main(argv) == 0
    capsys.readouterr()
    assert path.read_bytes() == original          # the cut unit redone identically, the others untouched
    assert main(argv) == 0                        # nothing left to do
    assert path.read_bytes() == original


def test_refusals_before_any_weights_load(offline_run, capsys, monkeypatch, tmp_path):
    import circuits.models

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the request was refused")

    monkeypatch.setattr(circuits.models, "load_model", no_weights)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv, graph, out = offline_run
    g = ["--model", MODEL, "--graph", str(graph)]
    o = ["--out", str(tmp_path / "o")]
    cases = [
        (["--level", "feature", "--explainer", "vocab", "--scorer", "tokens"], "--level feature needs --basis"),
        (["--level", "neuron", "--explainer", "vocab", "--scorer", "tokens,foo"], "--scorer 'foo' unknown"),
        (["--level", "neuron", "--explainer", "vocab", "--scorer", "simulation"], "simulation needs an LLM endpoint"),
        (["--level", "neuron", "--explainer", "exemplar-llm", "--scorer", "embedding", "--llm-base-url",
          "http://127.0.0.1:9/v1"], "exemplar-llm needs the endpoint's model name"),
        (["--level", "neuron", "--explainer", "self", "--scorer", "tokens"], "token-list explanations"),
        (["--level", "neuron", "--explainer", "vocab", "--scorer", "tokens", "--units", "d1.0@1.attn.z"],
         "--units d1.0@1.attn.z: a direction"),
        (["--level", "direction", "--explainer", "vocab", "--scorer", "tokens", "--units", "m1.n3"],
         "at level direction give heads or MLPs"),
        (["--level", "neuron", "--explainer", "vocab", "--scorer", "tokens", "--store", str(out / "store"),
          "--units", "m0.n1"], "has no activations at blocks.0.mlp.hook_post"),
        (["--level", "neuron", "--explainer", "vocab", "--scorer", "tokens", "--max-units", "0"],
         "--max-units must be >= 1"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *g, *args, *o)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    other = small_circuit(tmp_path / "gpt2.json", model="ioi-2l-gpt2")
    code, _, err = run(capsys, "--model", MODEL, "--graph", str(other), "--level", "neuron", "--explainer",
                       "vocab", "--scorer", "tokens", *o)
    assert code == 2 and "is a circuit of ioi-2l-gpt2, not of --model ioi-2l" in err
    changed = [a if a != "0" else "1" for a in argv[1:]]          # --seed is not in argv; change a count
    changed[changed.index("--per-node") + 1] = "3"
    code, _, err = run(capsys, *[a for a in changed if a != "--no-progress"])
    assert code == 2 and "holds a run with other settings (per_node differs)" in err


def test_direction_level_is_the_pca_of_each_node(tmp_path, capsys, zoo_model):
    from explainers.exemplars import held_out_documents
    from explainers.store import ActivationStore

    graph = small_circuit(tmp_path / "c.json")
    out = tmp_path / "d"
    code, stdout, err = run(capsys, "--model", MODEL, "--graph", str(graph), "--level", "direction", "--explainer",
                            "vocab", "--scorer", "tokens", "--units", "a1.h2,m1", "--per-node", "2", "--out",
                            str(out), "--tokens", "2000", "--seq-len", "32", "--window", "8")
    assert code == 0, err
    lines = lines_of(out)
    assert [(ln["unit"], ln["node"]) for ln in lines] == [   # in the order the nodes were given
        ("d1.0@1.attn.z", "a1.h2"), ("d1.1@1.attn.z", "a1.h2"), ("d1.0@1.mlp_out", "m1"), ("d1.1@1.mlp_out", "m1")]
    store = ActivationStore(out / "store")
    from explainers.exemplars import StoreIndex

    index = StoreIndex(store)
    train = ~held_out_documents(index.row_document, 0.3, 0)
    for hook, sl, units in (("blocks.1.attn.hook_z", slice(64, 96), lines[:2]),
                            ("blocks.1.hook_mlp_out", slice(None), lines[2:])):
        x = store.read(hook).double().numpy()[:, sl]
        xc = x - x.mean(0)
        w, V = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
        for k, ln in enumerate(units):
            v = V[:, np.argsort(-w)[k]]
            v = v * np.sign(v[np.argmax(np.abs(v))])               # the bases' sign convention
            proj = xc @ v
            assert max(ln["exemplars"]["explain"][0]["activations"]) == pytest.approx(proj[train].max(), rel=1e-4)


def test_feature_level_and_self_explanations(tmp_path, capsys, zoo_model):
    from explainers.sae.io import save_sae
    from explainers.sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=32, arch="relu-l1", centring="none", hook="blocks.1.hook_resid_pre",
                        model=MODEL, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=-1, keepdim=True))
    save_sae(sae, tmp_path / "sae")
    graph = small_circuit(tmp_path / "c.json")
    out = tmp_path / "f"
    code, _, err = run(capsys, "--model", MODEL, "--graph", str(graph), "--level", "feature", "--basis",
                       str(tmp_path / "sae"), "--explainer", "vocab", "--scorer", "tokens", "--max-units", "3",
                       "--out", str(out), "--tokens", "1500", "--seq-len", "32", "--window", "8")
    assert code == 0, err
    lines = lines_of(out)
    assert len(lines) == 3 and all(ln["unit"].endswith("@1.resid_pre") and ln["node"] == "" for ln in lines)
    from explainers.store import ActivationStore

    acts = sae.encode(ActivationStore(out / "store").read("blocks.1.hook_resid_pre"))
    contrib = acts.abs().mean(0) * sae.W_dec.norm(dim=-1)
    want = [f"f1.{i}@1.resid_pre" for i in torch.argsort(-contrib, stable=True)[:3].tolist()]
    assert [ln["unit"] for ln in lines] == want
    out = tmp_path / "s"
    code, _, err = run(capsys, "--model", MODEL, "--units", "a1.h2,m1.n3", "--level", "neuron", "--explainer",
                       "self", "--scorer", "embedding", "--out", str(out), "--tokens", "1500", "--seq-len", "32")
    assert code == 0, err
    for ln in lines_of(out):
        assert ln["explainer"] == "self" and ln["explanation_meta"]["layer"] == 1
        assert (ln["explanation"] or "").strip() or ln["explanation_failed"]
        assert len(ln["explanation_meta"]["candidates"]) == 5
