"""Facts about a TransformerBridge that the component graph and the engine need.

:func:`inspect_model` reads the bridge's config, components and weights (plus one tiny forward pass
that checks per-head outputs add up to the attention output) and returns a json-able dict; see
``patching/graph.py`` for what the facts mean.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _cfg(model: Any, key: str, default: Any = None) -> Any:
    return getattr(model.cfg, key, default)


def _hf_flag(model: Any, key: str) -> bool:
    """A boolean key from the bridge config or the wrapped HF model's config."""
    if bool(getattr(model.cfg, key, False)):
        return True
    hf = getattr(model, "original_model", None)
    hf_cfg = getattr(hf, "config", None)
    return bool(getattr(hf_cfg, key, False))


def _split_qkv_supported(model: Any) -> bool:
    """True when every attention bridge honours ``use_split_qkv_input`` (no side effects)."""
    try:
        from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
            JointQKVAttentionBridge,
        )
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
            PositionEmbeddingsAttentionBridge,
        )
    except ImportError:  # pragma: no cover - other TransformerLens layouts
        return False
    return all(isinstance(b._modules.get("attn"), (JointQKVAttentionBridge, PositionEmbeddingsAttentionBridge))
               for b in model.blocks)


def _mlp_out_is_zero(block: Any) -> bool:
    mlp = block._modules.get("mlp")
    try:
        w = mlp.W_out
    except Exception:  # noqa: BLE001 - any bridge without a readable W_out: keep the MLP
        return False
    return w is not None and bool((w == 0).all())


@contextmanager
def eval_mode(model: Any):
    """Put ``model`` in eval mode (no dropout); restore its training flag in ``finally``."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def inspect_model(model: Any) -> dict[str, Any]:
    """The json-able facts the graph is built from (see ``patching/graph.py``)."""
    if not hasattr(model, "blocks") or not hasattr(model, "hook_dict"):
        raise ValueError(f"inspect_model: expected a TransformerBridge with blocks, got {type(model).__name__}")
    hooks = model.hook_dict
    n_layers = len(model.blocks)
    info: dict[str, Any] = {
        "model": str(_cfg(model, "model_name", type(model).__name__)),
        "architecture": str(_cfg(model, "architecture", "")),
        "n_layers": n_layers, "d_model": int(_cfg(model, "d_model")), "d_vocab": int(_cfg(model, "d_vocab_out", 0)
                                                                               or _cfg(model, "d_vocab", 0)),
        "normalization": _cfg(model, "normalization_type"),
        "pos_embed": "embed" in model._modules and "pos_embed" in model._modules and "hook_pos_embed" in hooks,
        "logits_hook": "ln_final.hook_in" if "ln_final.hook_in" in hooks else "unembed.hook_in",
        "parallel": bool(_cfg(model, "parallel_attn_mlp", False)),
    }
    if "hook_embed" not in hooks:
        raise ValueError(f"inspect_model: {info['model']} has no hook_embed; cannot patch its embeddings")
    transformer = all("attn" in b._modules for b in model.blocks) and all(
        f"blocks.{L}.attn.hook_z" in hooks for L in range(n_layers))
    if not transformer:
        missing = [h for L in range(n_layers) for h in (f"blocks.{L}.hook_in", f"blocks.{L}.hook_out")
                   if h not in hooks]
        if missing:
            raise ValueError(f"inspect_model: {info['model']} lacks block hooks {missing[:3]}")
        info.update(family="recurrent", n_heads=0, d_head=0, d_mlp=0, mlp_layers=[], qkv_path="none",
                    supports_edges=False, pos_embed=False,
                    edge_reason="blocks without attention (recurrent / state-space / hybrid): "
                                "block-level node patching only")
        return info

    n_heads = int(_cfg(model, "n_heads"))
    info.update(family="transformer", n_heads=n_heads, d_head=int(_cfg(model, "d_head")),
                d_mlp=int(_cfg(model, "d_mlp", 0) or 0))
    attn_only = bool(_cfg(model, "attn_only", False)) or _hf_flag(model, "circuitexplain_attn_only")
    mlp_layers, skipped = [], {}
    for L, block in enumerate(model.blocks):
        if attn_only or "mlp" not in block._modules or f"blocks.{L}.hook_mlp_out" not in hooks:
            skipped[str(L)] = "attention-only model"
        elif _mlp_out_is_zero(block):
            skipped[str(L)] = "output projection is identically zero"
        else:
            mlp_layers.append(L)
    info["mlp_layers"] = mlp_layers
    info["skipped_mlps"] = skipped

    reasons = []
    from patching.gqa import n_kv_heads, ungroup_reason

    info["n_kv_heads"] = n_kv_heads(model)
    gqa = ungroup_reason(model)
    if gqa:
        reasons.append(f"grouped-query attention ({info['n_kv_heads']} k/v heads for {n_heads} query heads) "
                       f"that cannot be ungrouped: {gqa}")
    if info["parallel"]:
        reasons.append("parallel attention/MLP blocks")
    if bool(_cfg(model, "use_normalization_before_and_after", False)):
        reasons.append("normalised branch outputs (per-head outputs are not additive)")
    need = [f"blocks.{L}.{h}" for L in range(n_layers)
            for h in ("ln1.hook_in", "attn.hook_q", "attn.hook_k", "attn.hook_v")]
    projected_ok = all(h in hooks for h in need) and all("ln1" in b._modules for b in model.blocks) and not reasons
    split_ok = _split_qkv_supported(model)
    head_err, proj_err = _self_check(model, projected=projected_ok) if not reasons else (0.0, 0.0)
    info["logits_at_pos"] = _logits_check(model, info["logits_hook"])
    tol = max(1e-3, 8 * torch.finfo(model_dtype(model)).eps)  # float32: 1e-3; half precision: looser
    if info["n_kv_heads"] != n_heads and not reasons:
        err = _ungroup_check(model, split=split_ok)
        if err > tol:
            reasons.append(f"grouped-query attention ({info['n_kv_heads']} k/v heads for {n_heads} query heads): "
                           f"the ungrouped model does not reproduce it (error {err:.2g})")
    if projected_ok and proj_err > tol:
        log.info("%s: hook_q/k/v is not ln1(x) @ W + b (error %.2g); projected q/k/v path disabled",
                 info["model"], proj_err)
        projected_ok = False
    if head_err > tol:
        reasons.append(f"per-head outputs hook_z @ W_O do not add up to the attention output (error {head_err:.2g})")
    info["qkv_paths"] = [p for p, ok in (("projected", projected_ok), ("split", split_ok)) if ok]
    info["qkv_path"] = info["qkv_paths"][0] if info["qkv_paths"] else "none"
    if not info["qkv_paths"]:
        reasons.append("attention without per-head q/k/v inputs (no split-qkv fork, hook_q is not ln1(x) W_Q + b_Q)")
    mlp_in = {}
    for L in mlp_layers:
        if f"blocks.{L}.ln2.hook_in" in hooks:
            mlp_in[str(L)] = f"blocks.{L}.ln2.hook_in"
        elif info["normalization"] is None and f"blocks.{L}.mlp.hook_in" in hooks:
            mlp_in[str(L)] = f"blocks.{L}.mlp.hook_in"
        else:
            reasons.append(f"no pre-norm MLP input hook in block {L}")
            break
    info["mlp_in_hooks"] = mlp_in
    if info["logits_hook"] == "unembed.hook_in" and info["normalization"] is not None:
        reasons.append("no pre-norm logits input hook (ln_final.hook_in)")
    info["supports_edges"] = not reasons
    info["edge_reason"] = "; ".join(reasons)
    if reasons:
        log.info("%s: node-level patching only: %s", info["model"], info["edge_reason"])
    return info


def logits_from_residual(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The unembedding of the final residual stream ``x`` (the final norm first, when the model has one)."""
    ln = getattr(model, "ln_final", None)
    return model.unembed(x if ln is None else ln(x))


@torch.no_grad()
def _logits_check(model: Any, logits_hook: str) -> bool:
    """Whether :func:`logits_from_residual` of the input at ``logits_hook`` reproduces the model's logits (then the
    engine may unembed only the prediction positions; nothing else, such as logit soft-capping, follows)."""
    seen: dict[str, torch.Tensor] = {}
    d_vocab = max(int(getattr(model.cfg, "d_vocab", 2) or 2), 1)
    toks = (torch.arange(5, device=model_device(model)) * 7 % d_vocab).unsqueeze(0)
    try:
        with eval_mode(model), model.hooks(fwd_hooks=[(logits_hook, lambda x, hook: seen.update(x=x.detach()))]):
            want = model(toks)
        got = logits_from_residual(model, seen["x"])
    except Exception as e:  # noqa: BLE001 - any failure: the engine keeps whole-position logits
        log.info("logits check failed (%s: %s)", type(e).__name__, e)
        return False
    tol = max(1e-4, 8 * torch.finfo(model_dtype(model)).eps)
    return got.shape == want.shape and float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) <= tol


@torch.no_grad()
def _self_check(model: Any, *, projected: bool) -> tuple[float, float]:
    """On a tiny input: the max relative error of ``sum_h z_h W_O[h] + b_O`` against ``hook_attn_out``,
    and (when ``projected``) of ``ln1(x) @ W + b`` against ``hook_q/k/v`` (``x`` at ``ln1.hook_in``)."""
    from patching.wiring import projection

    cache: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(x: torch.Tensor, hook: Any) -> None:
            cache[name] = x.detach()
        return fn

    n_layers = len(model.blocks)
    names = [f"blocks.{L}.{h}" for L in range(n_layers) for h in ("attn.hook_z", "hook_attn_out")]
    if projected:
        names += [f"blocks.{L}.{h}" for L in range(n_layers)
                  for h in ("ln1.hook_in", "attn.hook_q", "attn.hook_k", "attn.hook_v")]
    d_vocab = max(int(getattr(model.cfg, "d_vocab", 2) or 2), 1)
    toks = (torch.arange(5, device=model_device(model)) * 7 % d_vocab).unsqueeze(0)
    with eval_mode(model), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        model(toks)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

    head_err = proj_err = 0.0
    for L in range(n_layers):
        attn = model.blocks[L].attn
        z = cache[f"blocks.{L}.attn.hook_z"]
        out = torch.einsum("bphd,hdm->bpm", z, attn.W_O.to(z.dtype))
        if attn.b_O is not None:
            out = out + attn.b_O
        head_err = max(head_err, rel(out, cache[f"blocks.{L}.hook_attn_out"]))
        if projected:
            x = model.blocks[L].ln1.original_component(cache[f"blocks.{L}.ln1.hook_in"])
            for inp in ("q", "k", "v"):
                W, b = projection(attn, inp, x.dtype)
                y = torch.einsum("bpd,hde->bphe", x, W) + (0 if b is None else b)
                proj_err = max(proj_err, rel(y, cache[f"blocks.{L}.attn.hook_{inp}"]))
    return head_err, proj_err


@torch.no_grad()
def _ungroup_check(model: Any, *, split: bool) -> float:
    """On a tiny input: the max relative error of the ungrouped model's logits (``patching/gqa.py``) against
    the model's own, with the default and (when ``split``) the split q/k/v path; ``inf`` when an ungrouped
    per-head hook does not have one head per query head."""
    from patching.wiring import prepared

    d_vocab = max(int(getattr(model.cfg, "d_vocab", 2) or 2), 1)
    toks = (torch.arange(5, device=model_device(model)) * 7 % d_vocab).unsqueeze(0)
    H = int(model.cfg.n_heads)
    with prepared(model):
        want = model(toks)
    err = 0.0
    for sp in (False, True) if split else (False,):
        heads: list[int] = []
        names = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_v"] + (
            ["blocks.0.attn.hook_k_input", "blocks.0.attn.hook_v_input"] if sp else [])
        hooks = [(n, lambda x, hook, _h=heads: _h.append(int(x.shape[2]))) for n in names]
        try:
            with prepared(model, split_qkv=sp, ungroup=True), model.hooks(fwd_hooks=hooks):
                got = model(toks)
        except Exception as e:  # noqa: BLE001 - any failure means: cannot ungroup this bridge
            log.info("%s: ungrouped forward failed (%s: %s)", type(model).__name__, type(e).__name__, e)
            return float("inf")
        if heads != [H] * len(names):
            return float("inf")
        err = max(err, float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)))
    return err


__all__ = ["logits_from_residual", "inspect_model", "model_device", "model_dtype", "eval_mode"]
