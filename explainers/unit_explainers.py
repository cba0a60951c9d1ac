"""Explanations of the units of a basis without an LLM: vocabulary projections and self-explanation.

Both return :class:`~explainers.llm.records.Explanation` records, like the LLM explainer, so the same scorers
read them.

**Vocabulary** (:func:`vocab_explanations`; logit lens, nostalgebraist 2020; direct paths and OV circuits, Elhage
et al. 2021). The explanation is a *token list*: the tokens whose embedding, on the direct path from the embedding
to the unit, activates it most (``Explanation.tokens``, which the ``tokens`` scorer reads; ``text`` is the same
list, comma-separated, for the ``embedding`` scorer and for reading). What the unit writes goes to ``meta``: the
logit lens of its write direction (promoted and suppressed tokens).

- neuron ``m{L}.n{I}``: :func:`explainers.vocab.neuron_input_tokens` (embedding through ``ln2`` and the neuron's own
  activation function); writes: the logit lens of its ``W_out`` row;
- head ``a{L}.h{H}`` (activation = its output norm): the top *source* tokens of its OV circuit
  (:func:`explainers.vocab.ov_circuit`), i.e. the tokens whose value vectors it moves most strongly, with the OV
  pairs and copying score in ``meta``. A head fires where it attends *from*, not on the tokens it moves, so the
  ``tokens`` scorer usually gives a head's list a low score: that is a measurement, not a bug;
- direction / SAE feature at hook ``h`` with read vector ``r`` (the basis' encoder column):
  :func:`direct_path_scores`, ``f(e) . r`` with ``f`` the hook's activation when the residual stream is the
  token's embedding alone: the embedding itself (residual hooks), the MLP's hidden activation (``mlp.hook_post``)
  or output (``hook_mlp_out``) of ``ln2(e)``, a head's value vector ``ln1(e) W_V`` (``attn.hook_z``: what ``z``
  would be if the head attended to that token alone) or the sum of their outputs (``hook_attn_out``). Exact at
  layer 0 (tested against the model run on one-token inputs), the direct-path approximation deeper.

**Self-explanation** (:func:`self_explanations`; Patchscopes, Ghandeharioun et al. 2024; SelfIE, Chen et al.
2024): each unit's write direction into the residual stream (``basis.write_directions``) is patched into the
interpretation prompt of :mod:`explainers.selfexplain` at ``blocks.{layer}.hook_resid_pre``, by default the block
after the unit's (where its output enters the stream; the unit's own block for the last layer), over a sweep of
scales, the scale chosen by that module's rule (largest log-probability gain of the continuation from the patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explainers.llm.records import Explanation
from explainers.units import hook_layer
from explainers.vocab import _ACTS, _raw, logit_lens, neuron_input_tokens, ov_circuit

RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def _mlp_hidden(model: Any, layer: int, h: Tensor) -> Tensor:
    """The MLP's post-activation ``[n, d_mlp]`` (``blocks.L.mlp.hook_post``) for normed inputs ``h``."""
    act_name = str(model.cfg.act_fn)
    if act_name not in _ACTS:
        raise ValueError(f"MLP activation function {act_name!r} not supported")
    W_in = model.W_in[layer].detach().float()
    b_in = getattr(model, "b_in", None)
    pre = h @ W_in + (b_in[layer].detach().float() if b_in is not None else 0.0)
    if getattr(model.cfg, "gated_mlp", False):
        return _ACTS[act_name](h @ model.W_gate[layer].detach().float()) * pre
    return _ACTS[act_name](pre)


def _value_vectors(model: Any, layer: int, h: Tensor) -> Tensor:
    """``[n, H, d_head]``: each query head's value vector of the normed inputs (GQA: value head ``h // group``)."""
    W_V = model.W_V[layer].detach().float()                         # [H_kv, d, d_head]
    H = int(model.cfg.n_heads)
    v = torch.einsum("nd,kde->nke", h, W_V)
    b_V = getattr(model, "b_V", None)
    if b_V is not None:
        v = v + b_V[layer].detach().float().reshape(W_V.shape[0], -1)
    return v.repeat_interleave(H // W_V.shape[0], dim=1)


@torch.no_grad()
def direct_path_scores(model: Any, hook: str, read: Float[Tensor, " d_hook"], *, chunk: int = 4096
                       ) -> Float[Tensor, " vocab"]:
    """``f(e) . read`` for every token embedding ``e`` (module docstring); one-line error for other hooks."""
    L = hook_layer(hook)
    last = hook.split(".")[-1]
    if L is None:
        raise ValueError(f"direct-path input tokens need a block hook, not {hook!r}")
    r = torch.as_tensor(read).detach().float().flatten().to(model.W_E.device)
    W_E = model.W_E.detach().float()
    blk = model.blocks[L]
    if hook == f"blocks.{L}.{last}" and last in RESIDUAL:
        def f(x):
            return x
    elif hook == f"blocks.{L}.mlp.hook_post":
        def f(x):
            return _mlp_hidden(model, L, _raw(blk.ln2)(x).float())
    elif hook == f"blocks.{L}.hook_mlp_out":
        b_out = getattr(model, "b_out", None)

        def f(x):
            out = _mlp_hidden(model, L, _raw(blk.ln2)(x).float()) @ model.W_out[L].detach().float()
            return out + (b_out[L].detach().float() if b_out is not None else 0.0)
    elif hook == f"blocks.{L}.attn.hook_z":
        def f(x):
            return _value_vectors(model, L, _raw(blk.ln1)(x).float()).flatten(1)
    elif hook == f"blocks.{L}.hook_attn_out":
        def f(x):
            z = _value_vectors(model, L, _raw(blk.ln1)(x).float())
            return torch.einsum("nhe,hem->nm", z, model.W_O[L].detach().float())
    else:
        raise ValueError(f"no direct path from the embeddings to {hook!r} (supported: resid_pre/mid/post, "
                         "mlp.hook_post, hook_mlp_out, attn.hook_z, hook_attn_out)")
    out = []
    for i in range(0, W_E.shape[0], chunk):
        y = f(W_E[i:i + chunk])
        if y.shape[-1] != r.numel():
            raise ValueError(f"{hook}: read vector has {r.numel()} entries, the hook has {y.shape[-1]}")
        out.append(y @ r)
    return torch.cat(out)


def write_directions(model: Any, basis: Any) -> Float[Tensor, "n d_model"]:
    """Each unit's write direction into the residual stream (``basis.write_directions``; for neurons the rows of
    ``W_out`` taken directly, on the model's device)."""
    if basis.kind == "neuron":
        return model.W_out[basis.layer].detach().float()
    return basis.write_directions(model).detach().float()


def _read_vectors(basis: Any) -> Tensor:
    """Encoder columns ``[d, n]`` of a direction or feature basis."""
    if hasattr(basis, "W_enc"):
        return basis.W_enc.detach().float()
    sae = getattr(basis, "sae", None)
    if sae is not None:
        return sae.W_enc.detach().float()
    raise ValueError(f"{basis.describe()}: no encoder to read units with")


def render_tokens(tokens: Sequence[str]) -> str:
    """A token list as readable text: stripped tokens, comma-separated (quoted when blank or holding a comma),
    each text once (tokens that differ only in their leading space read the same)."""
    shown = (t.strip() if t.strip() and "," not in t else repr(t) for t in tokens)
    return ", ".join(dict.fromkeys(shown))


def _tw(tw: Any) -> list[list[Any]]:
    return [[t, round(float(w), 4)] for t, w in zip(tw.tokens, tw.weights, strict=True)]


@torch.no_grad()
def vocab_explanations(model: Any, basis: Any, indices: Sequence[int], units: Sequence[str], *, k: int = 10
                       ) -> dict[str, Explanation]:
    """Token-list explanations of units ``indices`` of ``basis`` (module docstring), keyed by ``units``."""
    kind = basis.kind
    write = write_directions(model, basis) if kind != "head" else None
    reads = _read_vectors(basis) if kind in ("direction", "feature") else None
    out = {}
    for i, unit in zip(indices, units, strict=True):
        meta: dict[str, Any] = {"method": "vocab", "k": k}
        if kind == "neuron":
            inputs = neuron_input_tokens(model, basis.layer, int(i), k=k)
            tokens = inputs.tokens
            meta["input_side"] = "embedding through ln2 and the neuron's activation"
        elif kind == "head":
            ov = ov_circuit(model, basis.layer, int(i), k=k)
            tokens = tuple(dict.fromkeys(p[0] for p in ov.pairs))
            meta.update(input_side="OV circuit source tokens", ov_pairs=[list(p) for p in ov.pairs],
                        ov_outputs=_tw(ov.outputs), copying_score=ov.copying_score)
            write_dir = basis.write_directions(model)[int(i)]
        else:
            scores = direct_path_scores(model, basis.hook, reads[:, int(i)])
            top = torch.topk(scores, min(k, scores.numel()))
            tokens = tuple(model.tokenizer.decode([int(t)]) for t in top.indices)
            meta["input_side"] = f"direct path from the embeddings to {basis.hook}"
            meta["input_weights"] = [round(float(v), 4) for v in top.values]
        d = write[int(i)] if write is not None else write_dir
        lens = logit_lens(model, d, k=k)
        meta.update(promotes=_tw(lens.promoted), suppresses=_tw(lens.suppressed))
        out[unit] = Explanation(unit=unit, text=render_tokens(tokens), explainer="vocab", tokens=tokens, meta=meta)
    return out


def default_self_layer(model: Any, unit_layer: int) -> int:
    return min(unit_layer + 1, int(model.cfg.n_layers) - 1)


def self_explanations(model: Any, basis: Any, indices: Sequence[int], units: Sequence[str], *,
                      layer: int | None = None, prompt: str = "auto", scales: Sequence[float] | None = None,
                      max_new_tokens: int = 12) -> dict[str, Explanation]:
    """Self-explanations of units ``indices`` of ``basis`` (module docstring), one batch for all of them."""
    from explainers.selfexplain import DEFAULT_SCALES, self_explain_many

    dirs = write_directions(model, basis)[list(int(i) for i in indices)]
    at = default_self_layer(model, basis.layer) if layer is None else int(layer)
    results = self_explain_many(model, dirs, layer=at, prompt=prompt, scales=scales or DEFAULT_SCALES,
                                max_new_tokens=max_new_tokens)
    out = {}
    for unit, r in zip(units, results, strict=True):
        meta = {"method": "self", "layer": at, "scale": r.scale, "prompt": r.meta.get("prompt"),
                "candidates": [c.to_dict() for c in r.candidates]}
        out[unit] = Explanation(unit=unit, text=r.text, explainer="self",
                                failed=None if r.text else "no non-empty continuation at any scale", meta=meta)
    return out
