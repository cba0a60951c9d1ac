"""SAEs saved here load in SAELens (its own venv: it pins TransformerLens < 4) and encode the same activations
to the same latents. The venv is built by `make saelens-env` (scripts/saelens_env.sh), which `make test` runs."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from explainers.capture import capture
from explainers.sae import TensorSource, TrainConfig, load_sae, train_sae

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("CIRCUITEXPLAIN_SAELENS_VENV", ROOT / ".venv-saelens"))

SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
jobs = json.loads(sys.argv[1])
out = {}
for name, (path, acts_file, head_shape) in jobs.items():
    sae = SAE.load_from_disk(path, device="cpu")
    x = load_file(acts_file)["x"]
    if head_shape:
        x = x.reshape(x.shape[0], *head_shape)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    out[name + ".f"] = f.contiguous()
    out[name + ".x_hat"] = x_hat.reshape(x_hat.shape[0], -1).contiguous()
    out[name + ".arch"] = torch.tensor([ord(c) for c in sae.cfg.architecture()])
save_file(out, sys.argv[2])
"""

SPARSITY = {"relu-l1": dict(l1_coefficient=2.0), "topk": dict(k=8), "batchtopk": dict(k=8),
            "jumprelu": dict(l0_coefficient=0.05)}


def zoo_acts(m, hook, n_prompts=400):
    from circuits.tasks import get_task

    task = get_task("ioi", n=n_prompts, seed=3)
    toks = task.batch(m.tokenizer).clean
    a = capture(m, [hook], toks)[hook][:, 1:]
    return a.reshape(-1, a.shape[-1] if hook.endswith("resid_pre") else a.shape[-2] * a.shape[-1]).float()


def test_saelens_loads_our_saes_and_encodes_identically(zoo_model, tmp_path):
    py = VENV / "bin" / "python"
    if not py.is_file():
        pytest.fail(f"no SAELens venv at {VENV}: run `make saelens-env` (scripts/saelens_env.sh)")
    m = zoo_model("ioi-2l")
    jobs, ours, expected = {}, {}, {}
    for hook in ("blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"):
        x = zoo_acts(m, hook)
        fit, test = x[:-256], x[-256:]
        save_file({"x": test.contiguous()}, str(tmp_path / f"{hook}.safetensors"))
        combos = [(a, c) for a in SPARSITY for c in ("none", "learned", "mean")] if "resid" in hook else \
            [("topk", "mean")]
        for arch, centring in combos:
            name = f"{hook}-{arch}-{centring}"
            expected[name] = {"relu-l1": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
            cfg = TrainConfig(arch=arch, centring=centring, width=256, train_tokens=512 * 30, batch_size=512,
                              lr=1e-3, **SPARSITY[arch])
            train_sae(TensorSource(fit), cfg, tmp_path / name, hook=hook, model="ioi-2l", progress=False)
            sae = load_sae(tmp_path / name)
            with torch.no_grad():
                f = sae.encode(test)
                ours[name] = (f, sae.decode(f))
            jobs[name] = (str(tmp_path / name), str(tmp_path / f"{hook}.safetensors"),
                          [4, 32] if hook.endswith("hook_z") else None)
    res = subprocess.run([str(py), "-c", SCRIPT, json.dumps(jobs), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for name, (f, x_hat) in ours.items():
        assert "".join(chr(int(c)) for c in theirs[name + ".arch"]) == expected[name], name
        g = theirs[name + ".f"]
        assert torch.equal(g != 0, f != 0), name                  # the same latents fire
        torch.testing.assert_close(g, f, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(theirs[name + ".x_hat"], x_hat, atol=1e-5, rtol=1e-5, msg=name)
        assert (f != 0).any(), name
