"""The zoo: shipped checkpoints meet their figures, training is deterministic and resumable, and the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from circuits.cli import main
from circuits.zoo import RECIPES, Figure, Recipe, checkpoint_dir, get_recipe
from circuits.zoo.check import check
from circuits.zoo.paths import CHECKPOINTS

SHIPPED = sorted(n for n in RECIPES if (checkpoint_dir(n) / "model.safetensors").is_file())
checked = functools.cache(lambda name: check(name, device="cpu"))   # one measurement per model and session


def test_every_recipe_is_shipped():
    assert SHIPPED == sorted(RECIPES)


def test_recipe_round_trip_and_unknown_name():
    for r in RECIPES.values():
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="unknown zoo model 'nope'; choose one of .*ioi-2l"):
        get_recipe("nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_format(name):
    d = checkpoint_dir(name)
    recipe = RECIPES[name]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] and cfg["circuitexplain_zoo"] == name
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] and tcfg["bos_token"] == "<bos>" and tcfg["pad_token"] == "<pad>"
    assert (d / "tokenizer.json").read_bytes() == (checkpoint_dir(SHIPPED[0]) / "tokenizer.json").read_bytes()
    info = json.loads((d / "zoo.json").read_text())
    assert info["recipe"] == recipe.to_dict(), "shipped checkpoint was trained from a different recipe"
    assert info["passed"] is True
    if recipe.architecture != "mamba":
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        width = cfg.get("hidden_size", cfg.get("n_embd"))
        assert width // heads >= 32                                    # vLLM's CPU attention needs >= 32
    if recipe.attn_only:
        assert cfg["circuitexplain_attn_only"] is True
        weights = load_file(d / "model.safetensors")
        downs = [k for k in weights if k.endswith("mlp.down_proj.weight")]
        assert downs and all(float(weights[k].abs().max()) == 0.0 for k in downs)


def test_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert total < 15 * 2**20
    assert not list(CHECKPOINTS.rglob("train_state.pt"))


@pytest.mark.parametrize("name", SHIPPED)
def test_zoo_check_figures_meet_thresholds(name):
    result = checked(name)
    failed = [c for c in result["checks"] if not c["passed"]]
    assert result["passed"], failed
    recorded = json.loads((checkpoint_dir(name) / "zoo.json").read_text())["figures"]
    for f in RECIPES[name].figures:                  # re-measured == measured at train time
        assert result["figures"][f.name] == pytest.approx(recorded[f.name], abs=1e-3)


def test_induction_mechanism_oracle():
    """Zeroing the previous-token head destroys induction (Olsson et al.): loss rises to near chance."""
    if "attn2l-induction" not in SHIPPED:
        pytest.fail("attn2l-induction not trained")
    figs = checked("attn2l-induction")["figures"]
    assert figs["second_copy_loss"] < 0.3
    assert figs["prev_head_ablated_loss"] > figs["second_copy_loss"] + 2.0


# ------------------------------------------------------------------- training


def _tiny(name: str = "ioi-2l", **kw) -> Recipe:
    base = dict(steps=4, warmup=2, batch=8, checkpoint_every=2,
                config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32})
    base.update(kw)
    return dataclasses.replace(RECIPES[name], **base)


def _weights(d) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic(tmp_path):
    from circuits.zoo.train import train

    r = _tiny()
    train(r, tmp_path / "a", progress=False, measure=False)
    train(r, tmp_path / "b", progress=False, measure=False)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    train(dataclasses.replace(r, seed=1), tmp_path / "c", progress=False, measure=False)
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    info = json.loads((tmp_path / "a" / "zoo.json").read_text())
    assert info["recipe"] == r.to_dict()


def test_training_resumes_after_interrupt(tmp_path, monkeypatch):
    from circuits.zoo import data as zoo_data
    from circuits.zoo.train import STATE_FILE, train

    r = _tiny("attn2l-induction", config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 16}, restricted_softmax_steps=2)
    train(r, tmp_path / "straight", progress=False, measure=False)

    real, calls = zoo_data.DATA["induction"], []

    def interrupting(rng, batch, tok):
        calls.append(1)
        if len(calls) == 4:                               # Ctrl-C during step 3
            raise KeyboardInterrupt
        return real(rng, batch, tok)

    monkeypatch.setitem(zoo_data.DATA, "induction", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(r, tmp_path / "resumed", progress=False, measure=False)
    state = torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    monkeypatch.setitem(zoo_data.DATA, "induction", real)
    assert train(r, tmp_path / "resumed", progress=False, measure=False, max_steps=0) is None
    train(r, tmp_path / "resumed", progress=False, measure=False)
    assert not (tmp_path / "resumed" / STATE_FILE).exists()
    assert _same(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    # the attention-only recipe keeps its MLP output at exactly zero
    w = _weights(tmp_path / "resumed")
    assert all(float(w[k].abs().max()) == 0.0 for k in w if k.endswith("down_proj.weight"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_retraining_reproduces_the_shipped_weights(name, tmp_path):
    from circuits.zoo.train import train

    train(RECIPES[name], tmp_path, progress=False, measure=False)
    assert _same(_weights(tmp_path), _weights(checkpoint_dir(name)))


# ------------------------------------------------------------------- CLI


def test_cli_zoo_list_and_help(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    from circuits.pretrained import PRETRAINED

    assert {r["name"] for r in rows if r["kind"] == "zoo"} == set(RECIPES)
    assert {r["name"] for r in rows if r["kind"] == "pretrained"} == set(PRETRAINED)
    assert main(["zoo"]) == 2
    assert "SUBCOMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["zoo", "check", "--help"])
    assert e.value.code == 0 and "Exit code 0 when all pass" in capsys.readouterr().out


def test_cli_zoo_check_json_pass_and_fail(capsys, monkeypatch):
    if "ioi-2l" not in SHIPPED:
        pytest.fail("ioi-2l not trained")
    assert main(["zoo", "check", "ioi-2l", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is True and out["figures"]["accuracy"] >= 0.95
    impossible = dataclasses.replace(RECIPES["ioi-2l"], figures=(Figure("accuracy", 1.5, True),))
    monkeypatch.setitem(RECIPES, "ioi-2l", impossible)
    assert main(["zoo", "check", "ioi-2l", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False and out["checks"][0]["passed"] is False


def test_cli_errors_are_one_line(capsys):
    assert main(["zoo", "check", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitexplain: error: unknown zoo model 'nope'") and "\n" not in err


def test_cli_tasks(capsys, tmp_path):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("induction", "ioi", "greater_than", "dyck"))
    assert main(["tasks", "show", "ioi", "-n", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["pairs"]) == 2 and shown["metric"] == "logit_diff"
    assert main(["tasks"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a"}\n')
    assert main(["tasks", "show", str(bad)]) == 2
    assert f"{bad}:1: missing key(s)" in capsys.readouterr().err


def test_cli_tasks_show_with_model(capsys):
    if "ioi-2l" not in SHIPPED:
        pytest.fail("ioi-2l not trained")
    assert main(["tasks", "show", "ioi", "-n", "3", "--model", "ioi-2l", "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    for p in pairs:
        assert p["tokens"][0] == "<bos>" and p["top_clean"] == "▁" + p["answer"].strip()
        assert p["logit_diff_clean"] > p["logit_diff_corrupt"]
