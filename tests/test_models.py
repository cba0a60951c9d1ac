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


# ------------------------------------------------------------------------------------------------ model_facts


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_model_facts_agree_with_the_loaded_bridge(name, zoo_model):
    """Oracle: the bridge TransformerLens builds from the same checkpoint."""
    from circuits.models import model_facts

    f = model_facts(name)
    cfg = zoo_model(name).cfg
    assert f.kind == "zoo" and f.n_layers == cfg.n_layers and f.d_model == cfg.d_model
    assert f.family == ("recurrent" if RECIPES[name].architecture == "mamba" else "transformer")
    if f.family == "transformer":
        assert (f.n_heads, f.d_head, f.d_mlp, f.d_vocab) == (cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab)
        assert f.n_kv_heads == (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) and not f.gqa
        assert f.attn_only == RECIPES[name].attn_only
    else:
        assert f.n_heads == f.n_kv_heads == 0


def test_model_facts_of_pretrained_need_no_download(tmp_path, monkeypatch):
    from circuits.models import model_facts

    monkeypatch.setenv("CIRCUITEXPLAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    f = model_facts("smollm2-135m")
    assert (f.kind, f.family, f.n_layers, f.n_heads, f.n_kv_heads, f.gqa) == ("pretrained", "transformer", 30, 9, 3, True)
    assert list(tmp_path.iterdir()) == []
    assert type(f).from_dict(f.to_dict()) == f


def test_model_facts_from_local_configs_without_weights(tmp_path):
    """Configs of other architectures (no weights saved): GQA Llama, GPT-2 (n_inner None), multi-query
    GPT-BigCode, Mamba and RWKV (recurrent)."""
    from transformers import GPT2Config, GPTBigCodeConfig, LlamaConfig, MambaConfig, RwkvConfig

    from circuits.models import model_facts

    cases = {
        "llama": (LlamaConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                              intermediate_size=200, vocab_size=100), ("transformer", 3, 96, 6, 2, 16, 200, True)),
        "gpt2": (GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100), ("transformer", 2, 64, 4, 4, 16, 256, False)),
        "bigcode": (GPTBigCodeConfig(n_layer=2, n_embd=64, n_head=8, multi_query=True, vocab_size=100),
                    ("transformer", 2, 64, 8, 1, 8, 256, True)),
        "mamba": (MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=100), ("recurrent", 2, 32, 0, 0, 0, 0, False)),
        "rwkv": (RwkvConfig(num_hidden_layers=2, hidden_size=32, vocab_size=100), ("recurrent", 2, 32, 0, 0, 0, 0, False)),
    }
    for key, (cfg, want) in cases.items():
        d = tmp_path / key
        cfg.architectures = [key]
        cfg.save_pretrained(d)
        f = model_facts(d)
        got = (f.family, f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.d_head, f.d_mlp, f.gqa)
        assert f.kind == "local" and got == want, (key, got)


def test_model_facts_offline_hub_name_is_one_line(monkeypatch):
    from circuits.models import model_facts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        model_facts("some-org/never-cached-model")
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
