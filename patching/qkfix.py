"""AtP*'s QK fix for edge attribution: exact attention patterns for edges into queries and keys.

Kramár, Lieberum, Shah & Nanda 2024 ("AtP*: An efficient and scalable method for localizing LLM behaviour to
components", Sec. 3.1.1) observe that attribution patching fails for queries and keys when attention is
saturated: the gradient of a softmax at a near one-hot pattern is near zero, so a linear estimate misses
a key change that moves the attention elsewhere. Their fix keeps the linear approximation only *after*
the attention pattern: the change of the pattern itself is computed exactly, since it needs no forward
pass beyond the attention logits of one head.

For an edge ``s -> h<k>`` (``<q>`` alike) into head ``h`` of layer ``L`` this module computes, on the clean
run, the head's keys from the patched input ``ln1(x + d_s) @ W_K[h] + b_K[h]`` (``x`` the clean input of
layer ``L``, ``d_s`` the sender's ``ablated - clean`` output, at every position; rotated by the model's
rotary embedding when it has one), the patched logits against the clean queries, the patched pattern
``A'`` (causal softmax), and scores the edge by ``sum_{b,t,j} dm/dA[b,h,t,j] * (A'[b,t,j] - A[b,h,t,j]) / B``:
exact in the pattern, linear from the pattern on. With EAP-IG the other edges keep their integrated
gradients, and the q/k edges use the gradient at the pattern *at the clean run* (EAP-IG's last integration
point, ``alpha = 1``, so no extra pass), the point where the pattern change is computed, as in AtP*. (Measured
on ``attn2l-induction``, 32 prompts, seeds 0-4: edge AUC 0.955-0.981 this way; averaging the pattern gradient
over the integration points gave 0.909-0.974, and pairing each point's pattern change with its own gradient
0.929-0.981.) A head whose output reaches the metric linearly (no norm, MLP or later attention in between)
gets *exact* scores for its q/k edges (tested).

Nothing assumes an architecture: before scoring, :meth:`QKFix.verify` recomputes every layer's clean
pattern from the recorded queries and keys (rotary by transformers' ``apply_rotary_pos_emb`` with the
recorded ``cos`` / ``sin``; scale ``attn.scaling`` or ``1/sqrt(d_head)``; causal mask) and raises a
one-line ``ValueError`` when it does not reproduce ``hook_pattern`` (ALiBi, soft-capping, sliding windows,
other rotary layouts). Cost: per layer, one projection of every (sender, position) pair, about
``sum_L S_L`` extra q/k projections of the prompt batch, plus ``S_L`` patterns per head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from patching.wiring import Hook, Wiring, projection


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Llama's rotate-half RoPE on ``[N, P, H, dh]`` tensors (via transformers' own function)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qr.transpose(1, 2), kr.transpose(1, 2)


class QKFix:
    """Exact pattern changes for the q/k edges of a :class:`~patching.wiring.Wiring` (module docstring)."""

    def __init__(self, wiring: Wiring, model: Any):
        self.w, self.model = wiring, model
        self.groups = [r for r in wiring.receivers if r.input in ("q", "k")]
        if not self.groups:
            raise ValueError("qk_fix: the graph has no edges into queries or keys")
        self.receivers = {r.key for r in self.groups}
        self.layers = sorted({int(r.layer) for r in self.groups})
        hooks = model.hook_dict
        H = int(wiring.graph.meta["n_heads"])
        self.rotary, self.scale, self.ln, self.proj = {}, {}, {}, {}
        for L in self.layers:
            need = [f"blocks.{L}.attn.hook_{x}" for x in ("q", "k", "pattern")] + [f"blocks.{L}.ln1.hook_in"]
            missing = [h for h in need if h not in hooks]
            if missing:
                raise ValueError(f"qk_fix: layer {L} has no hook {missing[0]}; cannot recompute its attention pattern")
            rot = [f"blocks.{L}.attn.hook_{x}" for x in ("rot_q", "rot_k", "cos", "sin")]
            self.rotary[L] = all(h in hooks for h in rot)
            attn = model.blocks[L].attn
            s = getattr(getattr(attn, "original_component", None), "scaling", None)
            self.scale[L] = float(s) if s is not None else 1.0 / math.sqrt(int(wiring.graph.meta["d_head"]))
            self.ln[L] = (None if wiring.graph.meta.get("normalization") is None
                          else model.blocks[L].ln1.original_component)
            dev = wiring.layer_device(L)
            for inp in ("q", "k"):
                W, b = projection(attn, inp, wiring.dtype, H)
                self.proj[(L, inp)] = (W.to(dev), None if b is None else b.to(dev))

    # ---- hooks ------------------------------------------------------------------------------------------
    def capture_hooks(self, store: dict[str, Tensor]) -> list[Hook]:
        """Record each layer's clean ln1 input, queries, keys (rotated, with cos / sin) and pattern."""
        out: list[Hook] = []
        for L in self.layers:
            names = ["ln1.hook_in", "attn.hook_q", "attn.hook_k", "attn.hook_pattern"]
            if self.rotary[L]:
                names += ["attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_cos", "attn.hook_sin"]
            for n in names:
                def keep(x: Tensor, hook: Any, _k: str = f"{L}.{n}") -> None:
                    store[_k] = x.detach().clone()
                out.append((f"blocks.{L}.{n}", keep))
        return out

    def pattern_probe_hooks(self, probes: dict[int, Tensor]) -> list[Hook]:
        """Zero probes added to each layer's pattern: their gradient is dm/dA."""
        out: list[Hook] = []
        for L in self.layers:
            def add(x: Tensor, hook: Any, _L: int = L) -> Tensor:
                p = torch.zeros_like(x, requires_grad=True)
                probes[_L] = p
                return x + p
            out.append((f"blocks.{L}.attn.hook_pattern", add))
        return out

    # ---- the pattern ------------------------------------------------------------------------------------
    def _pattern(self, L: int, q: Tensor, k: Tensor) -> Tensor:
        """Causal softmax of ``q k^T * scale``: ``q [N, P, H, dh]`` and ``k`` (rotated) -> ``[N, H, P, P]`` float32."""
        s = torch.einsum("nthe,njhe->nhtj", q.float(), k.float()) * self.scale[L]
        P = s.shape[-1]
        causal = torch.ones(P, P, dtype=torch.bool, device=s.device).tril()
        return s.masked_fill(~causal, float("-inf")).softmax(-1)

    def _rotated(self, L: int, store: dict[str, Tensor], which: str, t: Tensor) -> Tensor:
        if not self.rotary[L]:
            return t
        cos, sin = store[f"{L}.attn.hook_cos"], store[f"{L}.attn.hook_sin"]
        q, k = _rotate(t, t, cos, sin)
        return q if which == "q" else k

    def verify(self, store: dict[str, Tensor]) -> None:
        """Raise ``ValueError`` when a layer's recorded pattern is not reproduced (module docstring)."""
        tol = max(1e-4, 16 * torch.finfo(self.w.dtype).eps)
        for L in self.layers:
            q, k = store[f"{L}.attn.hook_q"], store[f"{L}.attn.hook_k"]
            if self.rotary[L]:
                qr, kr = _rotate(q, k, store[f"{L}.attn.hook_cos"], store[f"{L}.attn.hook_sin"])
                err = max(float((qr - store[f"{L}.attn.hook_rot_q"]).abs().max()),
                          float((kr - store[f"{L}.attn.hook_rot_k"]).abs().max()))
                scale = float(store[f"{L}.attn.hook_rot_q"].abs().max()) or 1.0
                if err > tol * scale:
                    raise ValueError(f"qk_fix: layer {L}'s rotary embedding is not Llama's rotate-half RoPE "
                                     f"(error {err:.2g}); this attention variant is not supported")
                q, k = qr, kr
            err = float((self._pattern(L, q, k) - store[f"{L}.attn.hook_pattern"].float()).abs().max())
            if err > tol:
                raise ValueError(f"qk_fix: layer {L}'s attention pattern is not a causal softmax(q k^T * scale) "
                                 f"(error {err:.2g}); this attention variant is not supported")

    # ---- scores -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_scores(self, values: Tensor, store: dict[str, Tensor], D: Tensor, grads: dict[int, Tensor],
                   b: int, P: int) -> None:
        """``values[edge(s, h<q|k>)] += sum dm/dA * (A'_s - A)`` for every q/k edge (not yet divided by B)."""
        d = self.w.d_model
        for r in self.groups:
            L, inp = int(r.layer), r.input
            dev = r.device
            x = store[f"{L}.ln1.hook_in"].to(dev)                                       # [b, P, d]
            other = "k" if inp == "q" else "q"
            fixed = self._rotated(L, store, other, store[f"{L}.attn.hook_{other}"].to(dev))  # [b, P, H, dh]
            A = store[f"{L}.attn.hook_pattern"].float().to(dev)                          # [b, H, P, P]
            GA = grads[L].to(dev)                                                      # [b, H, P, P]
            W, bias = self.proj[(L, inp)]
            H = W.shape[0]
            per = max(1, (64 << 20) // max(1, 16 * b * H * P * (P + W.shape[-1])))  # senders per chunk
            for s0 in range(0, r.prefix, per):
                s1 = min(r.prefix, s0 + per)
                n = s1 - s0
                y = x.unsqueeze(0) + D[s0:s1].view(n, b, P, d).to(device=dev, dtype=x.dtype)   # [n, b, P, d]
                if self.ln[L] is not None:
                    y = self.ln[L](y)
                new = torch.einsum("nbpd,hde->nbphe", y, W)
                if bias is not None:
                    new = new + bias
                new = self._rotated(L, store, inp, new.reshape(n * b, P, H, -1))
                fx = fixed.repeat(n, 1, 1, 1)
                Ap = self._pattern(L, new, fx) if inp == "q" else self._pattern(L, fx, new)   # [n*b, H, P, P]
                dA = Ap.view(n, b, H, P, P) - A.unsqueeze(0)
                contrib = (dA * GA.unsqueeze(0)).sum(dim=(1, 3, 4))                     # [n, H]
                values[r.edge_idx[:, s0:s1].reshape(-1).to(values.device)] += contrib.T.reshape(-1).to(values.device)


__all__ = ["QKFix"]
