"""The patching benchmark produces every figure (timings are not asserted: this is not a timed test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers_models import gpt2_bridge, mamba_bridge, random_batch

from patching.bench import KEYS, BenchConfig, bench_patching, format_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = BenchConfig(chunk=4, n_edge_masks=4, repeats=1, ig_steps=2)


def test_bench_reports_every_figure():
    r = bench_patching(gpt2_bridge(), random_batch(B=4, P=8), CONFIG)
    for k in KEYS:
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["batch_size"] == 4 and r["n_edges"] == 137 and r["config"] == CONFIG.to_dict()
    assert r["naive_vs_batched_speedup"] == pytest.approx(r["naive_s_per_ablation"] / r["batched_s_per_ablation"])
    table = format_table(r)
    assert all(k in table for k in KEYS)
    json.dumps(r)


def test_bench_on_node_level_model_marks_edge_figures_missing():
    r = bench_patching(mamba_bridge(), random_batch(B=3, P=6), CONFIG)
    assert r["naive_s_per_ablation"] > 0 and r["batched_s_per_ablation"] > 0
    assert r["batched_edge_s_per_ablation"] is None and "recurrent" in r["note"]
    assert "n/a" in format_table(r)


def test_bench_cli_on_zoo_model(tmp_path, capsys):
    if not (ROOT / "circuits" / "zoo" / "checkpoints" / "ioi-2l" / "model.safetensors").is_file():
        pytest.fail("zoo model ioi-2l not trained yet")
    from circuits.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "patching", "--model", "ioi-2l", "--out", str(out), "-n", "4", "--chunk", "4",
                 "--edge-masks", "4", "--repeats", "1", "--ig-steps", "2"]) == 0
    r = json.loads(out.read_text())
    assert set(KEYS) <= set(r) and r["model"] == "ioi-2l" and r["task"] == "ioi" and r["batch_size"] == 4
    assert "naive_s_per_ablation" in capsys.readouterr().out
    # the script is the same command; bad options fail with exit code 2 before any model is loaded
    spec = importlib.util.spec_from_file_location("bench_patching", ROOT / "scripts" / "bench_patching.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "ioi-2l", "--out", str(out), "--chunk", "0"]) == 2


def test_bench_scale_figures_sampled_ablations_and_memory_batch():
    from patching.bench import SCALE_KEYS

    cfg = BenchConfig(chunk=None, n_edge_masks=2, repeats=1, ig_steps=2, max_ablations=3, prompt_batch=2)
    r = bench_patching(gpt2_bridge(), random_batch(B=4, P=8), cfg, memory_batch=random_batch(B=6, P=8, seed=1))
    for k in (*KEYS, *SCALE_KEYS, "eap_ig_memory_peak_rss_bytes"):
        assert isinstance(r[k], (int, float)) and r[k] > 0, k
    assert r["n_edges"] == 137 and r["eap_ig_memory_prompts"] == 6 and r["config"]["max_ablations"] == 3
    assert r["peak_rss_bytes"] >= r["eap_ig_memory_peak_rss_bytes"] > 0
    # the memory figures are printed in human units that read back as the measured byte counts (the unit
    # depends on the process: the whole test suite peaks above 1 GiB, a lone test below)
    lines = {ln.split()[0]: ln.split()[1:] for ln in format_table(r).splitlines()[1:]}
    for k in ("peak_rss_bytes", "eap_ig_memory_peak_rss_bytes"):
        value, unit = lines[k]
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}[unit]
        assert 1 <= float(value) < 1024 or unit in ("GiB", "B"), (k, lines[k])
        assert float(value) * scale == pytest.approx(r[k], rel=5e-3), (k, lines[k], r[k])
