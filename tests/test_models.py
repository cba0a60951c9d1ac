"""circuits.models: loading zoo models, local directories and hub names as TransformerBridges."""

from __future__ import annotations

import pytest
import torch

from circuits.models import load_model, load_tokenizer, resolve
from circuits.zoo import RECIPES, checkpoint_dir


def _shipped(name: str) -> bool:
    return (checkpoint_dir(name) / "model.safetensors").is_file()


def test_unknown_name_is_a_one_line_error_listing_the_zoo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for bad in ("no-such-model-xyz", "./missing/dir", "a/b/c", "bad name!"):
        with pytest.raises(ValueError) as e:
            load_model(bad, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg and repr(bad) in msg
        for name in RECIPES:
            assert name in msg


def test_hub_names_resolve_as_hub_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve("gpt2") == ("hub", "gpt2")
    assert resolve("EleutherAI/pythia-70m") == ("hub", "EleutherAI/pythia-70m")


def test_directory_without_config_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path, device="cpu")
    if _shipped("ioi-2l"):
        with pytest.raises(ValueError, match="unknown dtype 'float8'"):
            load_model("ioi-2l", device="cpu", dtype="float8")
        with pytest.raises(ValueError, match="either device or n_devices"):
            load_model("ioi-2l", device="cpu", n_devices=2)


def test_missing_checkpoint_says_how_to_train(monkeypatch, tmp_path):
    import circuits.zoo.paths as paths

    monkeypatch.setattr(paths, "CHECKPOINTS", tmp_path)
    with pytest.raises(ValueError, match="circuitexplain zoo train ioi-2l"):
        load_model("ioi-2l", device="cpu")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_zoo_bridge_matches_hf_and_has_per_head_hooks(name, zoo_model):
    from transformers import AutoModelForCausalLM

    bridge = zoo_model(name)
    d = checkpoint_dir(name)
    hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tok = load_tokenizer(name)
    tokens = torch.tensor([tok.encode("When Mary and John went to the store, John gave a drink to")])
    with torch.no_grad():
        assert torch.allclose(bridge(tokens), hf(tokens).logits, atol=1e-4)
    if RECIPES[name].architecture == "mamba":
        return
    # per-head outputs exist and sum (plus the output bias) to the attention output
    _, cache = bridge.run_with_cache(tokens)
    result = cache["blocks.0.attn.hook_result"]
    assert result.shape[2] == bridge.cfg.n_heads
    b_o = getattr(bridge.blocks[0].attn, "b_O", None)
    total = result.sum(2) + (b_o if b_o is not None else 0)
    assert torch.allclose(total, cache["blocks.0.hook_attn_out"], atol=1e-4)
    assert "blocks.1.hook_k_input" in bridge.hook_dict
    assert bridge.cfg.attn_only == RECIPES[name].attn_only
    if RECIPES[name].attn_only:
        assert float(cache["blocks.0.hook_mlp_out"].abs().max()) == 0.0


def test_load_tokenizer_from_disk():
    if not _shipped("ioi-2l"):
        pytest.fail("ioi-2l not trained")
    tok = load_tokenizer("ioi-2l")
    assert tok.name_or_path == str(checkpoint_dir("ioi-2l"))
    assert tok.bos_token_id == 0 and tok.pad_token_id == 2
