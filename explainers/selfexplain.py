"""Self-explanation: the subject model describes a direction of its own residual stream.

Patchscopes (Ghandeharioun et al. 2024) and SelfIE (Chen et al. 2024): the residual stream at
``blocks.{layer}.hook_resid_pre`` is *replaced*, at the placeholder positions of an interpretation prompt,
by the unit's direction scaled to ``scale`` times the prompt's mean residual norm at that hook (measured on
the unpatched prompt, BOS excluded); the continuation is decoded greedily with the patch in place.

Prompts (``{X}`` marks a patched placeholder; :data:`PROMPTS`):
- ``patchscope``: ``{X} {X} {X} {X} {X}. The meaning of {X} is`` (plain text; BOS first when the model
  prepends one);
- ``selfie``: the model's chat template around a user message of five placeholders, then the assistant's
  ``Sure, I will summarize the message:`` (SelfIE's interpretation prompt; for instruction-tuned models).

A sweep over ``scales`` runs in one batch. **Choice of scale** (stated rule): the scale whose continuation
the patch explains best, i.e. the largest mean over continuation tokens of
``log p_patched(c_t | prompt, c_<t) - log p_unpatched(c_t | prompt, c_<t)`` (the pointwise mutual information
between the patch and the continuation). The plain likelihood under the unpatched prompt would favour the
scale at which the patch changes nothing; this rule favours continuations that are specific to the direction.
Empty continuations are never chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

PROMPTS = {"patchscope": "{X} {X} {X} {X} {X}. The meaning of {X} is",
           "selfie": "selfie"}
SELFIE_USER = "{X}{X}{X}{X}{X}"
SELFIE_ASSISTANT = "Sure, I will summarize the message:"
DEFAULT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
_MARK = "\u2063PATCH\u2063"


@dataclass(frozen=True)
class ScaleResult:
    scale: float
    text: str
    pmi: float | None  # mean log-prob gain of the continuation from the patch (None: empty continuation)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "text": self.text, "pmi": self.pmi}


@dataclass(frozen=True)
class SelfExplanation:
    text: str | None
    scale: float | None
    candidates: tuple[ScaleResult, ...]
    prompt: str
    layer: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "scale": self.scale, "candidates": [c.to_dict() for c in self.candidates],
                "prompt": self.prompt, "layer": self.layer, "meta": dict(self.meta)}


def prompt_ids(model: Any, prompt: str = "auto", placeholder: str = " X") -> tuple[list[int], list[int], str]:
    """(token ids, placeholder positions, prompt name) of an interpretation prompt; ``auto`` is
    ``patchscope`` (on smollm2-135m it gave fewer empty and repetitive continuations than ``selfie``)."""
    tok = model.tokenizer
    if prompt == "auto":
        prompt = "patchscope"
    if prompt not in PROMPTS:
        raise ValueError(f"unknown self-explanation prompt {prompt!r}; choose auto, {', '.join(PROMPTS)}")
    if prompt == "selfie":
        if not getattr(tok, "chat_template", None):
            raise ValueError("the selfie prompt needs a tokenizer with a chat template; use patchscope")
        text = tok.apply_chat_template([{"role": "user", "content": SELFIE_USER.replace("{X}", _MARK)}],
                                       tokenize=False, add_generation_prompt=True) + SELFIE_ASSISTANT
        ids: list[int] = []
    else:
        text = PROMPTS[prompt].replace("{X}", _MARK)
        bos = tok.bos_token_id
        ids = [bos] if bos is not None and getattr(model.cfg, "default_prepend_bos", True) else []
    x_ids = tok(placeholder, add_special_tokens=False)["input_ids"]
    if not x_ids:
        raise ValueError(f"placeholder {placeholder!r} tokenizes to nothing")
    positions = []
    for k, seg in enumerate(text.split(_MARK)):
        if k:
            positions.append(len(ids))
            ids.append(x_ids[-1])
        if seg:
            ids.extend(tok(seg, add_special_tokens=False)["input_ids"])
    return ids, positions, prompt


def _logits(model: Any, tokens: Tensor, hook: str, patch: Tensor | None, positions: list[int]) -> Tensor:
    if patch is None:
        return model(tokens)

    def fn(act: Tensor, hook: Any = None) -> Tensor:
        act = act.clone()
        act[:, positions, :] = patch[:, None, :].to(act.dtype)
        return act

    with model.hooks(fwd_hooks=[(hook, fn)]):
        return model(tokens)


def self_explain(model: Any, direction: Float[Tensor, "... d_model"], *, layer: int, prompt: str = "auto",
                 scales: Sequence[float] = DEFAULT_SCALES, max_new_tokens: int = 12) -> SelfExplanation:
    """Patch ``direction`` (scaled) into the interpretation prompt at ``blocks.{layer}.hook_resid_pre`` and
    decode; see the module docstring for the prompts and the rule that picks the scale."""
    d = torch.as_tensor(direction).detach().flatten()
    return self_explain_many(model, d[None], layer=layer, prompt=prompt, scales=scales,
                             max_new_tokens=max_new_tokens)[0]


@torch.no_grad()
def self_explain_many(model: Any, directions: Float[Tensor, "n d_model"], *, layer: int, prompt: str = "auto",
                      scales: Sequence[float] = DEFAULT_SCALES, max_new_tokens: int = 12) -> list[SelfExplanation]:
    """:func:`self_explain` for ``n`` directions at once: one batch of ``n * len(scales)`` rows per step."""
    D = torch.as_tensor(directions).detach().to(torch.float32)
    if D.ndim != 2 or D.shape[1] != model.cfg.d_model:
        raise ValueError(f"directions must be [n, {model.cfg.d_model}], got {list(D.shape)}")
    norms = D.norm(dim=-1)
    if not torch.isfinite(D).all() or (norms == 0).any():
        raise ValueError("directions must be finite and non-zero")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} out of range 0..{model.cfg.n_layers - 1}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {list(scales)}")
    ids, positions, name = prompt_ids(model, prompt)
    device = model.W_U.device
    hook = f"blocks.{layer}.hook_resid_pre"
    base = torch.tensor([ids], device=device)
    captured: list[Tensor] = []
    with model.hooks(fwd_hooks=[(hook, lambda a, hook=None: captured.append(a.detach()))]):
        model(base)
    start = 1 if base[0, 0].item() == model.tokenizer.bos_token_id else 0
    rho = captured[0][0, start:].float().norm(dim=-1).mean()
    units = (D / norms[:, None]).to(device)
    sc = torch.tensor([float(s) for s in scales], device=device)
    patch = (units[:, None, :] * sc[None, :, None] * rho).reshape(-1, D.shape[1])  # row i*S + j
    rows, S = patch.shape[0], len(scales)
    tokens = base.repeat(rows, 1)
    stop = {t for t in (model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(t, int) and t >= 0}
    for _ in range(max_new_tokens):
        nxt = _logits(model, tokens, hook, patch, positions)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    cont = tokens[:, len(ids):]
    lp_patched = _logits(model, tokens, hook, patch, positions).float().log_softmax(-1)
    lp_plain = _logits(model, tokens, hook, None, positions).float().log_softmax(-1)
    prompt_text = model.tokenizer.decode(ids)
    out = []
    for i in range(D.shape[0]):
        results = []
        for j, s in enumerate(scales):
            r = i * S + j
            n = 0
            while n < cont.shape[1] and int(cont[r, n]) not in stop:
                n += 1
            text = model.tokenizer.decode(cont[r, :n].tolist()).strip().split("\n")[0].strip()
            pmi = None
            if text:
                steps = torch.arange(len(ids) - 1, len(ids) - 1 + n, device=device)
                tgt = cont[r, :n]
                pmi = float((lp_patched[r, steps, tgt] - lp_plain[r, steps, tgt]).mean())
            results.append(ScaleResult(scale=float(s), text=text, pmi=pmi))
        valid = [c for c in results if c.pmi is not None]
        best = max(valid, key=lambda c: c.pmi) if valid else None
        out.append(SelfExplanation(text=best.text if best else None, scale=best.scale if best else None,
                                   candidates=tuple(results), prompt=prompt_text, layer=layer,
                                   meta={"prompt": name, "hook": hook, "placeholders": positions,
                                         "residual_norm": float(rho),
                                         "rule": "max mean log-prob gain of the continuation from the patch"}))
    return out
