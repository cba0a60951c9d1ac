"""Builders of small random TransformerBridges and token batches for the engine's tests.

HF-backed bridges are built from configs (no hub); the tokenizer is a word-level one saved to and
reloaded from a temporary directory (TransformerLens needs a tokenizer loaded from disk).
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch

from patching.batch import TaskBatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 64


@functools.lru_cache(maxsize=4)
def tokenizer(vocab: int = VOCAB) -> Any:
    """A word-level tokenizer over ``<bos> <pad> t2 ... t{vocab-1}``, loaded from disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = {"<bos>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<pad>", eos_token="<bos>")
    d = tempfile.mkdtemp(prefix="ce-tok-")
    fast.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def _wrap(hf_model: Any, name: str, vocab: int) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer(vocab), device="cpu")


def gpt2_bridge(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, vocab: int = VOCAB, n_ctx: int = 16,
                seed: int = 0, zero_mlp: tuple[int, ...] = ()) -> Any:
    """A random GPT-2-style bridge (learned positions, LayerNorm, GELU MLP, biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=n_ctx,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.15,
                     bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():  # random biases (HF initialises them to zero)
            if name.endswith(".bias") and ".ln_" not in name:
                p.normal_(0.0, 0.1)
        for L in zero_mlp:
            m.transformer.h[L].mlp.c_proj.weight.zero_()
    return _wrap(m, "gpt2", vocab)


def llama_bridge(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int | None = None,
                 vocab: int = VOCAB, n_ctx: int = 16, seed: int = 0) -> Any:
    """A random Llama-style bridge (rotary, RMSNorm, gated SiLU MLP, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv_heads or n_heads, intermediate_size=2 * d_model, vocab_size=vocab,
                      max_position_embeddings=n_ctx, initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return _wrap(LlamaForCausalLM(cfg), "llama", vocab)


def native_bridge(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, vocab: int = VOCAB, n_ctx: int = 16,
                  normalization_type: str | None = None, act_fn: str = "relu", attn_only: bool = False,
                  positional_embedding_type: str = "standard", seed: int = 0) -> Any:
    """A ``TransformerBridge.boot_native`` model (no HF), by default without layer norm."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads, n_layers=n_layers,
                                  n_ctx=n_ctx, d_vocab=vocab, d_mlp=2 * d_model, act_fn=act_fn,
                                  normalization_type=normalization_type, attn_only=attn_only,
                                  positional_embedding_type=positional_embedding_type, seed=seed)
    b = TransformerBridge.boot_native(cfg)
    with torch.no_grad():  # boot_native zero-initialises biases; random ones exercise bias handling
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in b.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    b.eval()
    return b


def mamba_bridge(*, n_layers: int = 2, d_model: int = 32, vocab: int = VOCAB, seed: int = 0) -> Any:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    return _wrap(MambaForCausalLM(MambaConfig(hidden_size=d_model, num_hidden_layers=n_layers, vocab_size=vocab,
                                              state_size=4)), "mamba", vocab)


def random_batch(*, vocab: int = VOCAB, B: int = 6, P: int = 8, seed: int = 0, ragged: bool = True,
                 device: str | torch.device = "cpu") -> TaskBatch:
    """Random clean / corrupt prompts (BOS first, right-padded when ``ragged``) with random answers."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, vocab, (B, P), generator=g)
    corrupt = torch.randint(2, vocab, (B, P), generator=g)
    clean[:, 0] = corrupt[:, 0] = 0
    pos = torch.randint(P // 2, P, (B,), generator=g) if ragged else torch.full((B,), P - 1)
    pos[0] = P - 1
    for b in range(B):
        clean[b, pos[b] + 1:] = 1
        corrupt[b, pos[b] + 1:] = 1
    answer = torch.randint(2, vocab, (B,), generator=g)
    wrong = 2 + (answer - 2 + 1 + torch.randint(0, vocab - 3, (B,), generator=g)) % (vocab - 2)
    return TaskBatch(clean, corrupt, answer, wrong, pos).to(device)
