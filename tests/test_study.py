"""The SAE studies (evals/study.py, evals/study_report.py, evals/cli_study.py): matched-L0 interpolation against
hand-computed values, aggregation of tiny SAEs trained here on zoo models (rows re-derived from the saved SAEs and
stores), resume counted in training calls, and CLI refusals before any weights load."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from evals import study as S
from evals.study_report import write_study

# ---------------------------------------------------------------------------------------------------------------
# matched L0: hand-computed oracles


def test_interp_log_l0_hand_values():
    # values 0 at L0 4 and 1 at L0 16: linear in log L0, so L0 8 (the log midpoint) is 0.5, 4*sqrt(2) is 0.25
    got = S.interp_log_l0([16, 4], [1.0, 0.0], [4, 8, 4 * math.sqrt(2), 16, 2, 32])
    assert got[:4] == pytest.approx([0.0, 0.5, 0.25, 1.0], abs=1e-12)
    assert math.isnan(got[4]) and math.isnan(got[5])          # no extrapolation
    # three points, the middle segment: L0 10 -> 20 with values 3 -> 5; at L0 10*sqrt(20/10)... = 14.142: 4
    assert S.interp_log_l0([5, 10, 20], [1.0, 3.0, 5.0], [math.sqrt(200)]) == pytest.approx([4.0])
    # equal L0s are averaged
    assert S.interp_log_l0([4, 4, 16], [0.0, 2.0, 3.0], [4, 8]) == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError, match="L0 must be > 0"):
        S.interp_log_l0([0, 4], [1, 2], [2])


def test_common_l0_points_span_the_overlap():
    assert S.common_l0_points([[2, 8], [4, 16]], 3) == pytest.approx([4, 4 * math.sqrt(2), 8])
    assert S.common_l0_points([[4, 8, 16], [4, 16]], 3) == pytest.approx([4, 8, 16])
    assert S.common_l0_points([[1, 2], [4, 8]], 3) == []
    assert S.common_l0_points([[2, 8], [4, 16]], 1) == pytest.approx([math.sqrt(32)])


def _row(c, seed, l0, r2, kl, model="m", arch="relu-l1"):
    return {"model": model, "arch": arch, "centring": c, "seed": seed, "l0": l0, "explained_variance": 0.5,
            "ce_loss_recovered": 0.9, "error_linear_r2": r2, "error_kl_ratio": kl}


def test_matched_l0_and_effects_hand_computed():
    rows = [
        # mean centring, two seeds; curves over L0 2..32 and 4..16
        _row("mean", 0, 2, 0.10, 1.0), _row("mean", 0, 32, 0.50, 2.0),
        _row("mean", 1, 4, 0.20, 1.0), _row("mean", 1, 16, 0.40, 3.0),
        # learned, two seeds; over 4..64
        _row("learned", 0, 4, 0.30, 2.0), _row("learned", 0, 64, 0.70, 2.0),
        _row("learned", 1, 4, 0.50, 2.0), _row("learned", 1, 64, 0.50, 4.0),
    ]
    m = S.matched_l0(rows, n_points=3)
    # the common range is [4, 16]: points 4, 8, 16
    pts = sorted({r["l0"] for r in m})
    assert pts == pytest.approx([4, 8, 16])
    by = {(r["centring"], round(r["l0"])): r for r in m}
    # mean seed 0 at L0 8: log2 position 3 of 1..5 -> 0.10 + 0.40 * (3 - 1) / 4 = 0.30; seed 1: 0.30
    assert by["mean", 8]["error_linear_r2"] == pytest.approx(0.30)
    assert by["mean", 8]["error_linear_r2_std"] == pytest.approx(0.0, abs=1e-12)
    # mean at L0 4: seed 0 0.10 + 0.40 * 1/4 = 0.20, seed 1 0.20 -> 0.20; at 16: 0.40 and 0.40
    assert by["mean", 4]["error_linear_r2"] == pytest.approx(0.20)
    # learned at L0 16 (log2 4 of 2..6): seed 0 0.30 + 0.40 * 2/4 = 0.50, seed 1 0.50 -> 0.50
    assert by["learned", 16]["error_linear_r2"] == pytest.approx(0.50)
    # kl: learned at 16: seed 0 2.0, seed 1 2.0 + 2.0 * 2/4 = 3.0 -> mean 2.5, std (ddof 1) = 0.7071
    assert by["learned", 16]["error_kl_ratio"] == pytest.approx(2.5)
    assert by["learned", 16]["error_kl_ratio_std"] == pytest.approx(math.sqrt(0.5))
    # mean kl at 16: seed 0 1.0 + 1.0 * 3/4 = 1.75, seed 1 3.0 -> 2.375, std = |3 - 1.75| / sqrt(2)
    assert by["mean", 16]["error_kl_ratio"] == pytest.approx(2.375)
    eff = {round(e["l0"]): e for e in S.centring_effects(m) if e["versus"] == "learned"}
    assert eff[16]["d_error_linear_r2"] == pytest.approx(0.40 - 0.50)
    assert eff[16]["d_error_kl_ratio"] == pytest.approx(2.375 - 2.5)
    assert eff[16]["d_error_kl_ratio_std"] == pytest.approx(math.hypot(1.25 / math.sqrt(2), math.sqrt(0.5)))
    assert len(S.centring_effects(m)) == 3          # one other centring, three points


def test_hook_at_depth_and_ratios():
    assert S.hook_at_depth(2, 0.5) == ("blocks.0.hook_resid_post", 0.5)
    assert S.hook_at_depth(3, 0.5) == ("blocks.1.hook_resid_post", 2 / 3)
    assert S.hook_at_depth(4, 0.5) == ("blocks.1.hook_resid_post", 0.5)
    assert S.hook_at_depth(30, 0.5) == ("blocks.14.hook_resid_post", 0.5)
    assert S.hook_at_depth(1, 0.1) == ("blocks.0.hook_resid_post", 1.0)
    with pytest.raises(ValueError, match="depth"):
        S.hook_at_depth(2, 0)
    assert S.parse_ratio("4x", 128, "w") == 512 and S.parse_ratio("0.125x", 576, "k") == 72
    assert S.parse_ratio("300", 128, "w") == 300
    with pytest.raises(ValueError, match="--k 'x4'"):
        S.parse_ratio("x4", 128, "--k")


def test_density_summary_counts():
    d = [0.0, 0.0, 1e-6, 5e-4, 0.05, 0.2, 1.0]
    s = S.density_summary(d)
    assert s["n_dead"] == 2 and sum(s["density_hist"]) == 5
    assert s["dense_fraction"] == pytest.approx(2 / 7) and s["rare_fraction"] == pytest.approx(2 / 7)
    assert s["median_log10_density"] == pytest.approx(math.log10(0.05))
    assert s["density_hist"][0] == 1 and s["density_hist"][-1] == 1    # 1e-6 clipped into the first bin


# ---------------------------------------------------------------------------------------------------------------
# tiny studies trained here

TINY = S.Budget(tokens=1500, train_tokens=1024, batch_size=128, lr=3e-3, holdout=0.2, ce_contexts=4,
                store_batch_size=4, shard_batches=2)


@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = S.train_sae

    def counted(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    monkeypatch.setattr(S, "train_sae", counted)
    return calls


def _loader(zoo_model):
    loaded = []

    def load(name):
        loaded.append(name)
        return zoo_model(name)

    return load, loaded


def test_saes_study_rows_aggregation_and_resume(tmp_path, zoo_model, counting):
    from circuits.models import model_facts
    from explainers.sae import load_sae
    from explainers.store import ActivationStore

    models = ["ioi-2l", "ioi-2l-d32"]
    facts = {m: model_facts(m) for m in models}
    units = S.plan_saes(models, facts, ["0.25x", "0.5x"], k="0.0625x", budget=TINY)
    assert [u.train.width for u in units] == [32, 64, 8, 16]
    assert [u.train.k for u in units] == [8, 8, 2, 2]
    load, loaded = _loader(zoo_model)
    cache = tmp_path / "cache"
    rows = S.run_units(units, cache, loader=load, progress=False)
    assert len(counting) == 4 and loaded == models

    for u, r in zip(units, rows, strict=True):
        d = cache / "saes" / u.key
        # the row's reconstruction figures recomputed from the saved SAE and the store's held-out shards
        store = ActivationStore(cache / "stores" / u.store.key)
        _, held = store.split(TINY.holdout)
        x = store.read(u.store.hook, held).double()
        sae = load_sae(d)
        with torch.no_grad():
            x_hat, f = sae(x.float())
        e = x - x_hat.double()
        ev = 1 - float((e ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
        assert r["explained_variance"] == pytest.approx(ev, abs=1e-5)
        assert r["l0"] == pytest.approx(float((f != 0).sum(1).double().mean()), abs=1e-9)
        assert r["l0"] <= u.train.k + 1e-9
        m = json.loads((d / "metrics.json").read_text())
        fired = np.asarray(m["density"])
        assert r["n_dead"] == int((fired == 0).sum()) and sum(r["density_hist"]) == u.train.width - r["n_dead"]
        assert r["hook"] == "blocks.0.hook_resid_post" and r["relative_depth"] == 0.5
        assert r["width_ratio"] == pytest.approx(u.train.width / facts[u.store.model].d_model)

    out = tmp_path / "out"
    doc = write_study(out, "saes", rows, {"reference_width_ratio": 0.5, "units_planned": 4, "units_reported": 4},
                      "circuitexplain study saes ...")
    j = json.loads((out / "study.json").read_text())
    assert j == json.loads(json.dumps(doc)) and len(j["rows"]) == 4 and "unit" not in j["rows"][0]
    with open(out / "study.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["key"] for t in table] == [u.key for u in units]
    for t, r in zip(table, rows, strict=True):
        for k in ("explained_variance", "ce_loss_recovered", "error_linear_r2", "error_kl_ratio", "l0"):
            assert float(t[k]) == pytest.approx(r[k], rel=1e-5, abs=1e-9)
    md = (out / "study.md").read_text()
    assert md.count("| ioi-2l |") == 3 and md.count("| ioi-2l-d32 |") == 3      # 2 rows + reference table
    assert (out / "ev_ce_vs_width.png").stat().st_size > 0 and (out / "density.png").stat().st_size > 0
    assert "Partial" not in md
    write_study(tmp_path / "part", "saes", rows[:3], {"units_planned": 4, "units_reported": 3}, "cmd", plots=False)
    assert "**Partial: 3 of the 4 planned SAEs are finished" in (tmp_path / "part" / "study.md").read_text()

    # resume: nothing retrained, no model loaded, the same rows
    again = S.run_units(units, cache, loader=load, progress=False)
    assert len(counting) == 4 and loaded == models and again == rows
    # one unit's row lost (killed after training, before its row): only that unit runs again, same figures
    (cache / "saes" / units[2].key / S.ROW_JSON).unlink()
    third = S.run_units(units, cache, loader=load, progress=False)
    assert counting[4:] == [cache / "saes" / units[2].key] and loaded == models + ["ioi-2l-d32"]
    assert third == rows


def test_centring_study_matched_values_come_from_the_rows(tmp_path, zoo_model):
    from circuits.models import model_facts

    facts = {"ioi-2l-d32": model_facts("ioi-2l-d32")}
    units = S.plan_centring(["ioi-2l-d32"], facts, archs=["topk", "relu-l1"], centrings=["none", "mean"],
                            width="0.5x", ks=["0.0625x", "0.125x"], l1s=[1.0, 8.0], thresholds=[1.0], seeds=[0, 1],
                            budget=TINY)
    assert len(units) == 16 and {u.train.k for u in units if u.train.arch == "topk"} == {2, 4}
    load, _ = _loader(zoo_model)
    rows = S.run_units(units, tmp_path / "cache", loader=load, progress=False)
    doc = write_study(tmp_path / "out", "centring", rows, {"points": 2}, "cmd")
    for arch in ("topk", "relu-l1"):
        # the points: the two ends of the L0 range every (centring, seed) curve covers
        curves = {}
        for r in rows:
            if r["arch"] == arch:
                curves.setdefault((r["centring"], r["seed"]), []).append(r["l0"])
        lo, hi = max(min(c) for c in curves.values()), min(max(c) for c in curves.values())
        got = sorted({r["l0"] for r in doc["matched"] if r["arch"] == arch})
        assert got == pytest.approx([lo, hi] if lo < hi else [])
    assert all(r["l0"] <= r["sparsity"] + 1e-9 for r in rows if r["arch"] == "topk")   # TopK: at most k
    for rec in doc["matched"]:
        per_seed = []
        for s in (0, 1):
            cv = sorted((r["l0"], r["error_linear_r2"]) for r in rows
                        if r["arch"] == rec["arch"] and r["centring"] == rec["centring"] and r["seed"] == s)
            per_seed.append(np.interp(np.log(rec["l0"]), np.log([c[0] for c in cv]), [c[1] for c in cv]))
        assert rec["error_linear_r2"] == pytest.approx(float(np.mean(per_seed)), abs=1e-9)
        assert rec["error_linear_r2_std"] == pytest.approx(float(np.std(per_seed, ddof=1)), abs=1e-9)
    assert len(doc["effects"]) == len(doc["matched"]) // 2
    md = (tmp_path / "out" / "study.md").read_text()
    assert "mean vs none, error_linear_r2: lower at" in md
    assert (tmp_path / "out" / "centring-ioi-2l-d32.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# CLI: refusals before weights


@pytest.mark.parametrize("argv,needle", [
    (["saes", "--models", "ioi-2l,nope"], "unknown model 'nope'"),
    (["saes", "--models", "ioi-2l,ioi-2l"], "given twice"),
    (["saes", "--models", "ioi-2l", "--widths", "4x,512"], "--widths '512'"),
    (["saes", "--models", "ioi-2l", "--widths", "2x", "--reference-width", "4x"], "--reference-width 4x"),
    (["saes", "--models", "ioi-2l", "--widths", "0.0625x", "--reference-width", "0.0625x", "--k", "16"],
     "more than its smallest width"),
    (["saes", "--models", "ioi-2l", "--depth", "1.5"], "depth must be in (0, 1]"),
    (["saes", "--models", "ioi-2l", "--train-tokens", "100"], "train_tokens (100)"),
    (["saes", "--models", "ioi-2l", "--seeds", "0,0"], "--seeds '0,0'"),
    (["centring", "--models", "ioi-2l", "--archs", "topk,relu"], "unknown architecture 'relu'"),
    (["centring", "--models", "ioi-2l", "--centrings", "mean"], "at least two centrings"),
    (["centring", "--models", "ioi-2l", "--centrings", "mean,median"], "unknown centring 'median'"),
    (["centring", "--models", "ioi-2l", "--l1", "4,-1"], "--l1 '4,-1'"),
    (["centring", "--models", "ioi-2l", "--width", "8", "--k", "16"], "more than --width 8"),
    (["centring", "--models", "ioi-2l", "--holdout", "1"], "holdout must be in (0, 1)"),
    (["saes", "--models", "ioi-2l", "--widths", "2x,4x", "--done-only"], "none of the 2 planned units"),
])
def test_cli_refuses_in_one_line_before_weights(argv, needle, tmp_path, monkeypatch, capsys):
    import circuits.models
    from circuits.cli import main

    def no_weights(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(circuits.models, "load_model", no_weights)
    rc = main(["study", *argv, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_cli_plan_lists_units_without_weights(tmp_path, monkeypatch, capsys):
    import circuits.models
    from circuits.cli import main

    monkeypatch.setattr(circuits.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    rc = main(["study", "saes", "--models", "ioi-2l,smollm2-135m", "--widths", "2x,4x", "--plan",
               "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[-1].startswith("4 units, 4 to do")
    assert any("smollm2-135m--14.resid_post--topk-learned-w2304-k72-s0-" in line for line in out)
    assert any("ioi-2l--0.resid_post--topk-learned-w256-k16-s0-" in line for line in out)


def test_trimmed_evaluation_equals_evaluate_sae(tmp_path, zoo_model):
    """The cheap path (one unpadded context at a time, clean / zero passes cached) gives evaluate_sae's numbers:
    the same SAE (trained twice from the same seed) measured both ways."""
    from dataclasses import replace

    from circuits.models import model_facts

    facts = {"ioi-2l": model_facts("ioi-2l")}
    plain = S.plan_saes(["ioi-2l"], facts, ["0.25x"], k="0.0625x", budget=TINY)[0]
    trimmed = replace(plain, trim_contexts=True)
    assert trimmed.key != plain.key and "trim_contexts" not in plain.to_dict()
    load, _ = _loader(zoo_model)
    a, b = S.run_units([plain, trimmed], tmp_path, loader=load, progress=False)
    for k in ("explained_variance", "l0", "error_linear_r2", "ce_clean", "ce_sae", "ce_zero", "kl_sae",
              "ce_loss_recovered"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert b["kl_random"] > 0 and a["kl_random"] > 0
    m = json.loads((tmp_path / "saes" / trimmed.key / "metrics.json").read_text())
    assert m["passes"] == "trimmed, clean cached" and m["n_kl_positions"] > 0
