"""``eval circuits --level``: faithfulness by level (evals/levels.py) against oracles.

* node level: a circuit's metric equals hand-written hooks that patch the ablated heads' ``hook_z`` and MLPs'
  ``hook_mlp_out`` with the corrupted run's values;
* neuron level: keeping all or none of an MLP's neurons equals keeping or ablating that MLP at the node level;
* feature level with the identity basis on every MLP's neurons (``NeuronBasis``): the same circuit metric as the
  neuron level (heads excluded there) at every size, error nodes that carry nothing (f of errors alone 0, of all
  features 1);
* a basis whose decoder is zero: every effect goes through the error nodes (errors alone f = 1, features 0, the
  whole score on the errors) and the report warns;
* reports, resume from the per-level files, the CLI, one-line refusals before any weights load.
"""

from __future__ import annotations

import json

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from evals.levels import Evaluator, LevelsConfig, NodeLevel, compare_levels, default_units, error_warning
from evals.levels_report import rows, write_levels_report

N_PROMPTS = 16


@pytest.fixture(scope="module")
def ioi(zoo_model):
    from circuits.discover import make_task, split_task

    model = zoo_model("ioi-2l")
    task = make_task("ioi", N_PROMPTS, 0, model)
    train, test = split_task(task, N_PROMPTS // 2, 0)
    return model, task, train.batch(model.tokenizer), test.batch(model.tokenizer)


def hand_metric(model, batch, ablate_heads: set[tuple[int, int]], ablate_mlps: set[int]) -> float:
    """Mean logit difference with the given heads (at hook_z) and MLPs (hook_mlp_out) set to the corrupted run's
    values, written without the engine."""
    names = [f"blocks.{L}.attn.hook_z" for L in range(2)] + [f"blocks.{L}.hook_mlp_out" for L in range(2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.corrupt, names_filter=lambda n: n in names)

        def z_hook(L):
            def fn(z, hook):
                z = z.clone()
                for (l2, h) in ablate_heads:
                    if l2 == L:
                        z[:, :, h] = cache[f"blocks.{L}.attn.hook_z"][:, :, h]
                return z
            return fn

        hooks = [(f"blocks.{L}.attn.hook_z", z_hook(L)) for L in range(2)]
        hooks += [(f"blocks.{L}.hook_mlp_out", lambda x, hook, L=L: cache[f"blocks.{L}.hook_mlp_out"])
                  for L in ablate_mlps]
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
    rows_ = torch.arange(len(batch))
    last = logits[rows_, batch.pos]
    return float((last[rows_, batch.answer] - last[rows_, batch.wrong]).double().mean())


def test_node_level_circuit_equals_hand_written_hooks(ioi):
    model, task, _, test = ioi
    level = NodeLevel(model, LevelsConfig(levels=("node",)), task.metric, neurons=False)
    assert level.ids == ("a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0", "a1.h0", "a1.h1", "a1.h2", "a1.h3", "m1")
    ev = level.evaluator(test)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(4, len(level.ids), generator=g) < 0.5
    got = ev.metric(keep)
    for k in range(len(keep)):
        heads = {(int(u[1]), int(u[4])) for u, kept in zip(level.ids, keep[k].tolist(), strict=True)
                 if u.startswith("a") and not kept}
        mlps = {int(u[1]) for u, kept in zip(level.ids, keep[k].tolist(), strict=True)
                if u.startswith("m") and not kept}
        assert float(got[k]) == pytest.approx(hand_metric(model, test, heads, mlps), abs=1e-4)
    everything = ev.metric(torch.ones(1, len(level.ids), dtype=torch.bool))
    assert float(ev.faithfulness(everything)[0]) == pytest.approx(1.0, abs=1e-6)


def test_neuron_level_all_or_none_equals_node_level(ioi):
    model, task, _, test = ioi
    cfg = LevelsConfig(levels=("neuron", "node"))
    node = NodeLevel(model, cfg, task.metric, neurons=False)
    neuron = NodeLevel(model, cfg, task.metric, neurons=True)
    assert len(neuron.ids) == 8 + 2 * 256 and set(neuron.kinds) == {"attn_head", "neuron"}
    g = torch.Generator().manual_seed(2)
    keep_node = torch.rand(5, len(node.ids), generator=g) < 0.5
    keep_neuron = torch.zeros(5, len(neuron.ids), dtype=torch.bool)
    for j, u in enumerate(neuron.ids):
        owner = u.split(".n")[0] if ".n" in u else u
        keep_neuron[:, j] = keep_node[:, node.ids.index(owner)]
    a = node.evaluator(test).metric(keep_node)
    b = neuron.evaluator(test).metric(keep_neuron)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


class ZeroDecoder:
    """A basis at ``hook`` whose features fire (ReLU of a fixed random projection) but whose decoder is zero:
    the reconstruction is the bias 0, so the error node holds the whole activation."""

    def __init__(self, hook: str, d: int, n: int = 8) -> None:
        self.hook, self.name = hook, "zero-decoder"
        self._enc = torch.randn(d, n, generator=torch.Generator().manual_seed(0))
        self._d, self._n = d, n

    @property
    def n_units(self) -> int:
        return self._n

    @property
    def d_in(self) -> int:
        return self._d

    def encode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        return torch.relu(acts @ self._enc.to(acts))

    def decode(self, units: Float[Tensor, "... n"]) -> Float[Tensor, "... d"]:
        return units @ self.directions.to(units) + self.bias.to(units)

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        return torch.zeros(self._n, self._d)

    @property
    def bias(self) -> Float[Tensor, " d"]:
        return torch.zeros(self._d)


def test_error_share_is_everything_when_the_decoder_is_zero(ioi, tmp_path):
    model, task, _, _ = ioi
    hook = "blocks.1.hook_resid_post"
    cfg = LevelsConfig(levels=("feature",), n_prompts=N_PROMPTS, random_seeds=1, units=(1, 2, 4))
    report = compare_levels("ioi-2l", task, cfg, bridge=model, bases={hook: ZeroDecoder(hook, 128)})
    c = report.curves["feature"]
    share = c.extra["error_share"]
    assert share["n_error_nodes"] == 1 and c.n_units > 1  # some features fire
    assert share["f_errors_only"] == pytest.approx(1.0, abs=1e-6)
    assert share["f_features_only"] == pytest.approx(0.0, abs=1e-6)
    assert share["score_share"] == pytest.approx(1.0, abs=1e-9)
    assert c.top_units[0][0] == "err@1.resid_post"
    assert c.faithfulness[0] == pytest.approx(1.0, abs=1e-6)  # the top unit (the error) is the whole effect
    assert len(report.warnings) == 1 and "error nodes alone recover f = 1.000" in report.warnings[0]
    paths = write_levels_report(report, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert report.warnings[0] in md and paths["plot"].stat().st_size > 10_000
    row = rows(report)[0]
    assert (row["f_errors_only"], row["units_f80"]) == (share["f_errors_only"], 1)


def test_identity_basis_reproduces_the_neuron_curve(ioi):
    """Features = the neurons themselves (identity encoder / decoder at every mlp.hook_post): the feature
    circuit with k units is the neuron circuit with the same k neurons (heads never ablated at either level)."""
    from explainers.bases.neurons import NeuronBasis

    model, task, _, _ = ioi
    bases = {f"blocks.{L}.mlp.hook_post": NeuronBasis.from_model(model, L) for L in range(2)}
    units = (1, 2, 5, 10, 20, 50, 100, 200, 400)
    cfg = LevelsConfig(levels=("feature", "neuron"), n_prompts=N_PROMPTS, random_seeds=1, units=units,
                       neuron_heads=False)
    report = compare_levels("ioi-2l", task, cfg, bridge=model, bases=bases)
    feat, neur = report.curves["feature"], report.curves["neuron"]
    assert neur.n_units == 512 and feat.n_units == 512 + 2  # every neuron fires (SiLU), plus two error nodes
    assert feat.units == neur.units == units
    rank_f = [u.split("@")[0].replace("f", "m", 1).replace(".", ".n", 1) for u, _ in feat.top_units]
    assert rank_f == [u for u, _ in neur.top_units]  # f0.5@0.mlp.post <-> m0.n5, same order
    for (_, a), (_, b) in zip(feat.top_units, neur.top_units, strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)
    torch.testing.assert_close(torch.tensor(feat.metric), torch.tensor(neur.metric), atol=1e-4, rtol=0)
    share = feat.extra["error_share"]  # the identity misses nothing: its error nodes are 0
    assert share["f_errors_only"] == pytest.approx(0.0, abs=1e-6)
    assert share["f_features_only"] == pytest.approx(1.0, abs=1e-6)
    assert share["score_share"] == pytest.approx(0.0, abs=1e-6)


def test_report_resume_and_cli(ioi, tmp_path, monkeypatch, capsys):
    from circuits.cli import main

    out = tmp_path / "levels"
    argv = ["eval", "circuits", "--model", "ioi-2l", "--task", "ioi", "--level", "node", "-n", str(N_PROMPTS),
            "--random-seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| node | 10 |" in text and "levels.png" in text
    saved = json.loads((out / "results.json").read_text())
    curve = saved["curves"]["node"]
    assert curve["units"] == list(range(1, 11)) and curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)
    assert saved["split"]["n_discovery"] + saved["split"]["n_heldout"] == N_PROMPTS
    assert saved["rows"][0]["units_f80"] == next(k for k, f in zip(curve["units"], curve["faithfulness"],
                                                                   strict=True) if f >= 0.8)
    # a rerun loads the level's file and never loads the model
    import evals.run

    monkeypatch.setattr(evals.run, "load_eval_model", lambda *a, **k: pytest.fail("model loaded on resume"))
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["curves"] == saved["curves"]


def test_refusals_before_weights(monkeypatch, tmp_path):
    import evals.run

    monkeypatch.setattr(evals.run, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match="unknown level 'heads'"):
        LevelsConfig(levels=("heads",))
    with pytest.raises(ValueError, match="held-out prompts"):
        LevelsConfig(split=0.0)
    with pytest.raises(ValueError, match="--sae is only used by --level feature"):
        LevelsConfig(levels=("node",), saes=("x",))
    with pytest.raises(ValueError, match="--level feature needs --sae"):
        compare_levels("ioi-2l", "ioi", LevelsConfig(levels=("feature",)))
    with pytest.raises(ValueError, match=r"--sae .*nope: not an SAE directory \(no cfg.json"):
        compare_levels("ioi-2l", "ioi", LevelsConfig(levels=("feature",), saes=(str(tmp_path / "nope"),)))
    with pytest.raises(ValueError, match="--units must be increasing"):
        LevelsConfig(units=(5, 2))


def test_default_units_and_warning_rule():
    assert default_units(7) == (1, 2, 3, 4, 5, 6, 7)
    assert default_units(520) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 520)
    assert default_units(500) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert error_warning({"f_errors_only": 0.2, "f_features_only": 0.9}, 0.5) is None
    assert "alone recover f = 0.600" in error_warning({"f_errors_only": 0.6, "f_features_only": 0.9}, 0.5)
    assert "recovers only f = 0.300" in error_warning({"f_errors_only": 0.1, "f_features_only": 0.3}, 0.5)


def test_evaluator_batches_masks():
    """Masks are handed to the patcher ``masks_per_call`` at a time and averaged in float64."""

    class Fake:
        metric_name = "logit_diff"
        clean_metric = torch.tensor([2.0, 4.0])
        ablated_metric = torch.tensor([0.0, 0.0])
        calls: list[int] = []

        def run(self, ablate):
            self.calls.append(len(ablate))
            return (~ablate).float().sum(1, keepdim=True).expand(-1, 2) * torch.tensor([1.0, 2.0])

    ev = Evaluator(Fake(), lambda keep: ~keep, masks_per_call=2)
    keep = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    m = ev.metric(keep)
    assert Fake.calls == [2, 1] and m.dtype == torch.float64
    torch.testing.assert_close(m, torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64))
    torch.testing.assert_close(ev.faithfulness(m), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
