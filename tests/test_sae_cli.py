"""`circuitexplain sae collect | train | metrics` through the real entry point, on temporary directories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.sae_metrics import error_linear_r2
from explainers.sae import load_sae
from explainers.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
CE = [sys.executable, "-m", "circuits.cli"]
HOOK = "blocks.1.hook_resid_pre"


def run(*args, ok=True):
    res = subprocess.run([*CE, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={"CIRCUITEXPLAIN_THREADS": "1", "OMP_NUM_THREADS": "1",
                              **{k: v for k, v in __import__("os").environ.items()}})
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_sae_train_then_metrics_end_to_end(tmp_path):
    out = tmp_path / "sae"
    run("sae", "train", "--model", "ioi-2l", "--hook", HOOK, "--arch", "topk", "--k", "8", "--centring", "mean",
        "--width", "2x", "--tokens", "6000", "--seq-len", "24", "--train-tokens", "8192", "--train-batch", "512",
        "--out", out, "--no-progress", "--threads", "1")
    for f in ("cfg.json", "sae_weights.safetensors", "training.json", "metrics.json", "density.png"):
        assert (out / f).is_file(), f
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["d_sae"] == 256
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["circuitexplain"]["centring"] == "mean"
    m = json.loads((out / "metrics.json").read_text())
    for k in ("mse", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered", "error_linear_r2",
              "error_kl_ratio", "mean_error_data_cos"):
        assert isinstance(m[k], float), k
    assert m["l0"] == pytest.approx(8.0, abs=0.2)
    # recomputed independently from the saved activations and weights: EV and error_linear_r2
    store = ActivationStore(out / "store")
    sae = load_sae(out)
    x = store.read(HOOK, m["heldout_shards"])
    with torch.no_grad():
        e = x - sae(x)[0]
    ev = 1 - float((e.double() ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum())
    assert m["explained_variance"] == pytest.approx(ev, abs=1e-6)
    fit = next(store.batches(HOOK, m["n_fit_tokens"], seed=m["seed"], shards=m["fit_shards"], buffer_shards=16))
    with torch.no_grad():
        assert m["error_linear_r2"] == pytest.approx(error_linear_r2(fit, fit - sae(fit)[0], x, e), abs=1e-7)
    # `sae metrics` reproduces the file
    before = (out / "metrics.json").read_text()
    run("sae", "metrics", out, "--model", "ioi-2l", "--store", out / "store", "--threads", "1")
    assert (out / "metrics.json").read_text() == before
    # rerun of a finished training: nothing retrained, same bytes
    w = (out / "sae_weights.safetensors").read_bytes()
    run("sae", "train", "--model", "ioi-2l", "--hook", HOOK, "--arch", "topk", "--k", "8", "--centring", "mean",
        "--width", "2x", "--tokens", "6000", "--seq-len", "24", "--train-tokens", "8192", "--train-batch", "512",
        "--out", out, "--no-progress", "--no-metrics", "--threads", "1")
    assert (out / "sae_weights.safetensors").read_bytes() == w


def test_sae_collect_and_one_line_errors(tmp_path, capsys):
    from circuits.cli import main

    assert main(["sae", "collect", "--model", "ioi-2l", "--hooks", "blocks.0.hook_resid_post,blocks.1.mlp.hook_post",
                 "--tokens", "500", "--seq-len", "16", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "500 tokens x 2 hook(s)" in capsys.readouterr().out
    assert ActivationStore(tmp_path / "s").n_rows == 500
    for args, msg in [
        (["train", "--model", "ioi-2l", "--hook", HOOK, "--arch", "topk", "--centring", "mean", "--width", "64",
          "--out", tmp_path / "x"], "--arch topk needs --k"),
        (["train", "--model", "ioi-2l", "--hook", HOOK, "--arch", "relu-l1", "--centring", "mean", "--width", "wide",
          "--out", tmp_path / "x"], "--width 'wide'"),
        (["collect", "--model", "ioi-2l", "--hooks", "blocks.5.hook_resid_post", "--tokens", "10",
          "--out", tmp_path / "y"], "no hook 'blocks.5.hook_resid_post'"),
        (["collect", "--model", "ioi-2l", "--hooks", HOOK, "--tokens", "10", "--corpus", "nothing-here.txt",
          "--out", tmp_path / "y"], "corpus 'nothing-here.txt'"),
    ]:
        assert main(["sae", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
