"""Vocabulary space: what a unit writes to and reads from, in tokens (no LLM).

- :func:`logit_lens` (nostalgebraist 2020; the "direct logit" view of Elhage et al. 2021): a direction ``d`` the
  unit writes into the residual stream (a neuron's ``W_out`` row, a feature's decoder row, a residual
  direction), read through the unembedding: ``scores = norm_weight(d) @ W_U``; top promoted (largest) and
  suppressed (smallest) tokens. **Final norm:** the final RMSNorm / LayerNorm maps ``x -> g * (x - mean(x)) /
  s(x) + b``. For one direction the positive factor ``1/s(x)`` depends on the whole residual and only scales
  every logit alike, so it is dropped (rankings unchanged); the mean subtraction (LayerNorm only) and the
  gain ``g`` are linear and applied; the bias ``b`` and ``b_U`` add the same logits whatever ``d`` is, so they
  are left out. ``final_norm="none"`` uses ``W_U`` alone.
- :func:`input_tokens` (direct path): the tokens whose embeddings, through the norm in front of the unit
  (the model's own module, applied to every embedding row) and its read-out, give the largest value; for an
  MLP neuron (:func:`neuron_input_tokens`) the read-out is the neuron's own activation function (gated MLPs:
  ``act(x W_gate) * (x W_in)``). Attention and earlier layers are ignored (the embedding-only path).
- :func:`ov_circuit` (Elhage et al. 2021): a head's OV circuit from the token embeddings,
  ``ln1(W_E) W_V W_O`` through the final norm's gain and ``W_U``: what each source token, when attended to,
  makes the head promote; top (source -> output) pairs, top outputs over all sources, and the copying score
  (fraction of the source tokens, all of the vocabulary or those given, whose top output is the token
  itself).
  Grouped-query attention: query head ``h`` uses value head ``h // (n_heads / n_kv_heads)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class TokenWeights:
    """Tokens (decoded strings) with their token ids and scores, best first."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    weights: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "ids": list(self.ids), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenWeights:
        return cls(tokens=tuple(d["tokens"]), ids=tuple(d["ids"]), weights=tuple(d["weights"]))


@dataclass(frozen=True)
class VocabProjection:
    promoted: TokenWeights
    suppressed: TokenWeights
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"promoted": self.promoted.to_dict(), "suppressed": self.suppressed.to_dict(), "meta": dict(self.meta)}


@dataclass(frozen=True)
class OVProjection:
    pairs: tuple[tuple[str, str, float], ...]  # (source token, output token, weight), largest first
    outputs: TokenWeights                      # output tokens by their largest weight over all sources
    copying_score: float
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [list(p) for p in self.pairs], "outputs": self.outputs.to_dict(),
                "copying_score": self.copying_score, "meta": dict(self.meta)}


def _tokens(model: Any, ids: Tensor) -> tuple[str, ...]:
    tok = model.tokenizer
    return tuple(tok.decode([int(i)]) for i in ids.tolist())


def _top(model: Any, scores: Tensor, k: int, largest: bool) -> TokenWeights:
    k = min(k, scores.numel())
    vals, ids = torch.topk(scores, k, largest=largest)
    return TokenWeights(tokens=_tokens(model, ids), ids=tuple(int(i) for i in ids), weights=tuple(float(v) for v in vals))


def _check_direction(model: Any, direction: Tensor, what: str) -> Tensor:
    d = torch.as_tensor(direction).detach().flatten().to(model.W_U.device, torch.float32)
    if d.numel() != model.cfg.d_model:
        raise ValueError(f"{what} has {d.numel()} entries, the model's d_model is {model.cfg.d_model}")
    if not torch.isfinite(d).all():
        raise ValueError(f"{what} is not finite")
    return d


def final_norm_direction(model: Any, direction: Float[Tensor, "... d_model"], final_norm: str = "weight"
                         ) -> Float[Tensor, "... d_model"]:
    """The direction as the unembedding sees it (module docstring: centred for LayerNorm, times the gain)."""
    if final_norm not in ("weight", "none"):
        raise ValueError(f"final_norm must be 'weight' or 'none', got {final_norm!r}")
    d = direction.to(torch.float32)
    kind = getattr(model.cfg, "normalization_type", None)
    if final_norm == "none" or kind is None:
        return d
    if kind in ("LN", "LNPre"):
        d = d - d.mean()
    weight = _norm_weight(model.ln_final)
    return d * weight if weight is not None else d


def _raw(module: Any) -> Any:
    """The HF module inside a bridge component: calling it applies the model's own norm without the bridge's
    hooks (a bridge ``ln1`` records its input for the attention's split-qkv path, a side effect we avoid)."""
    inner = getattr(module, "_original_component", None)
    return inner if inner is not None else module


def _norm_weight(module: Any) -> Tensor | None:
    inner = getattr(module, "_original_component", module)
    w = getattr(inner, "weight", None)
    if w is None:
        w = getattr(module, "w", None)
    return None if w is None else w.detach().to(torch.float32)


@torch.no_grad()
def logit_lens(model: Any, direction: Float[Tensor, "... d_model"], *, k: int = 10, final_norm: str = "weight"
               ) -> VocabProjection:
    """Top ``k`` promoted and suppressed tokens of a residual-stream write direction (module docstring)."""
    d = final_norm_direction(model, _check_direction(model, direction, "direction"), final_norm)
    scores = d @ model.W_U.detach().to(torch.float32)
    return VocabProjection(promoted=_top(model, scores, k, True), suppressed=_top(model, scores, k, False),
                           meta={"method": "logit_lens", "final_norm": final_norm,
                                 "norm": str(getattr(model.cfg, "normalization_type", None))})


@torch.no_grad()
def input_tokens(model: Any, read: Float[Tensor, "... d_model"], *, norm: Callable[[Tensor], Tensor] | None = None,
                 k: int = 10, chunk: int = 8192) -> TokenWeights:
    """Tokens whose embedding ``e`` maximises ``norm(e) . read`` (``norm``: the model's norm module in front
    of the unit, e.g. ``model.blocks[L].ln2``; ``None`` for a direction read from the raw residual)."""
    r = _check_direction(model, read, "read direction")
    f = _raw(norm) if norm is not None else None
    return _top(model, _embedding_scores(model, lambda x: (f(x) if f is not None else x) @ r, chunk), k, True)


def _embedding_scores(model: Any, f: Callable[[Tensor], Tensor], chunk: int) -> Tensor:
    W_E = model.W_E.detach().to(torch.float32)
    return torch.cat([f(W_E[i:i + chunk]).to(torch.float32) for i in range(0, W_E.shape[0], chunk)])


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu, "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@torch.no_grad()
def neuron_input_tokens(model: Any, layer: int, index: int, *, k: int = 10, chunk: int = 8192) -> TokenWeights:
    """Tokens whose embedding alone (through ``ln2`` of ``layer``) most activates MLP neuron ``index``
    (its post-activation value, ``blocks.L.mlp.hook_post``)."""
    n_layers, d_mlp = model.cfg.n_layers, model.W_in.shape[-1]
    if not 0 <= layer < n_layers or not 0 <= index < d_mlp:
        raise ValueError(f"neuron m{layer}.n{index} does not exist (layers 0..{n_layers - 1}, neurons 0..{d_mlp - 1})")
    act_name = str(model.cfg.act_fn)
    if act_name not in _ACTS:
        raise ValueError(f"neuron m{layer}.n{index}: activation function {act_name!r} not supported")
    act = _ACTS[act_name]
    w_in = model.W_in[layer][:, index].detach().to(torch.float32)
    b_in = _bias(model, "b_in", layer, index)
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    w_gate = model.W_gate[layer][:, index].detach().to(torch.float32) if gated else None
    ln2 = _raw(model.blocks[layer].ln2)

    def f(x: Tensor) -> Tensor:
        h = ln2(x).to(torch.float32)
        pre = h @ w_in + b_in
        return act(h @ w_gate) * pre if w_gate is not None else act(pre)

    return _top(model, _embedding_scores(model, f, chunk), k, True)


def _bias(model: Any, name: str, layer: int, index: int) -> float:
    try:
        b = getattr(model, name)
    except AttributeError:
        return 0.0
    return 0.0 if b is None else float(b[layer][index])


@torch.no_grad()
def ov_circuit(model: Any, layer: int, head: int, *, k: int = 10, final_norm: str = "weight", chunk: int = 1024,
               sources: Sequence[int] | None = None) -> OVProjection:
    """A head's OV circuit from the token embeddings through the unembedding (module docstring). ``sources``
    restricts the source tokens (e.g. a task's names): pairs, outputs and the copying score are then taken
    over them only."""
    n_heads = model.cfg.n_heads
    if not 0 <= layer < model.cfg.n_layers or not 0 <= head < n_heads:
        raise ValueError(f"head a{layer}.h{head} does not exist ({model.cfg.n_layers} layers x {n_heads} heads)")
    W_V = model.W_V[layer].detach().to(torch.float32)
    kv = head // (n_heads // W_V.shape[0])
    norm_kind = getattr(model.cfg, "normalization_type", None)
    W_out = model.W_O[layer][head].detach().to(torch.float32)  # [d_head, d]
    if final_norm != "none" and norm_kind in ("LN", "LNPre"):
        W_out = W_out - W_out.mean(-1, keepdim=True)  # the final LayerNorm's centring, folded in
    gain = _norm_weight(model.ln_final) if final_norm == "weight" and norm_kind is not None else None
    if gain is not None:
        W_out = W_out * gain
    # factorised through d_head: logits[s] = (ln1(W_E[s]) W_V) (W_O g W_U), V x d_head x V multiply-adds
    right = W_out @ model.W_U.detach().to(torch.float32)  # [d_head, V]
    ln1 = _raw(model.blocks[layer].ln1)
    W_E = model.W_E.detach().to(torch.float32)
    src_ids = torch.arange(W_E.shape[0]) if sources is None else torch.as_tensor(list(sources), dtype=torch.long)
    if src_ids.numel() == 0 or int(src_ids.min()) < 0 or int(src_ids.max()) >= W_E.shape[0]:
        raise ValueError(f"sources must be token ids in 0..{W_E.shape[0] - 1}")
    W_E = W_E[src_ids]
    best_vals, best_ids, col_max = [], [], torch.full((right.shape[1],), -torch.inf)
    for i in range(0, W_E.shape[0], chunk):
        logits = (ln1(W_E[i:i + chunk]).to(torch.float32) @ W_V[kv]) @ right  # [chunk, V]
        v, j = logits.max(-1)
        best_vals.append(v)
        best_ids.append(j)
        col_max = torch.maximum(col_max, logits.max(0).values)
    best_vals, best_ids = torch.cat(best_vals), torch.cat(best_ids)
    src = torch.topk(best_vals, min(k, best_vals.numel())).indices
    toks = model.tokenizer
    pairs = tuple((toks.decode([int(src_ids[s])]), toks.decode([int(best_ids[s])]), float(best_vals[s])) for s in src)
    copying = float((best_ids == src_ids).float().mean())
    return OVProjection(pairs=pairs, outputs=_top(model, col_max, k, True), copying_score=copying,
                        meta={"method": "ov_circuit", "head": f"a{layer}.h{head}", "value_head": kv,
                              "final_norm": final_norm, "n_sources": int(src_ids.numel())})
