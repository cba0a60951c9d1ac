"""Node ablations that recompute only what they change (the fast path of :class:`~patching.exact.NodePatcher`).

A mask whose first ablated node sits in layer ``L`` leaves everything before that node as in the
clean run. For a chunk of such masks the runner

1. builds the residual stream just after layer ``L``'s ablated nodes from the recorded clean one:
   heads add ``sum_h mask_h (z'_h - z_h) W_O[h]`` to the stream between attention and MLP (exact: a
   head's output is linear in ``hook_z``; checked on the clean run; one ``[K, H+1] @ [H+1, B*P*d]``
   product for all ``K`` masks), an MLP or a recurrent block adds
   ``mlp' - mlp`` to the stream leaving the block; layer ``L``'s MLP is re-run only when heads or
   neurons of ``L`` are ablated (an ablated MLP, not re-run, is never recomputed);
2. runs blocks ``L+1..`` on ``K * B`` rows (:class:`~patching.replay.Replay`), the TransformerLens
   node hooks ablating the later layers' nodes as in a whole forward;
3. runs the last block's MLP, the final norm and the unembedding at the prediction position only.

So an ablation in the last layer costs a few position-wise matrix products, and one in the first
layer skips its attention. Masks are grouped by first layer; layers or models whose recorded calls do
not reproduce the clean forward (:meth:`Replay.verify`), and masks that ablate embeddings, take whole
forward passes. The results equal whole-forward patching to float precision (tested against it).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.parts import Part
from patching.wiring import SenderGroup

#: The sender groups with a fast path here (``SenderGroup.kind`` of patching/kinds.py's built-in kinds); a mask
#: that ablates a node of any other kind re-runs that node's layer whole (and the last layer at every position).
_FAST = ("heads", "mlp", "neurons", "block")


def _other(masks: dict[str, Tensor | None]) -> bool:
    """Whether a layer's masks ablate a node of a kind without a fast path."""
    return any(m is not None for k, m in masks.items() if k not in _FAST)


def _tile(t: Tensor, K: int) -> Tensor:
    """``K`` copies of ``t`` along the batch dimension (mask-major rows)."""
    return t.repeat(K, *([1] * (t.dim() - 1)))


class SuffixRunner:
    """Runs node masks that all start at one layer (see the module docstring) for a NodePatcher."""

    def __init__(self, patcher: Any, part: Part):
        self.p, self.part, self.rp = patcher, part, part.replay
        w, replay = patcher.wiring, part.replay
        self.n_layers = replay.n_layers
        self.pos = part.batch.pos
        self.by_layer: dict[int, dict[str, SenderGroup]] = {}
        for g in w.senders:
            if g.layer is not None:
                self.by_layer.setdefault(g.layer, {})[g.kind] = g
        # each node's stage: 2L + its kind's replay_stage (patching/kinds.py): 2L for heads, neurons, a block (and
        # any other kind: its layer re-run whole), 2L + 1 for the MLP of layer L (masks whose first ablated node is
        # an MLP skip its layer entirely); -1: the inputs (embeddings), which need a whole forward
        stage = torch.full((patcher.graph.n_nodes,), -1, dtype=torch.long)
        for g in w.senders:
            if g.layer is not None:
                stage[g.node_idx.cpu()] = 2 * g.layer + g.unit_kind.replay_stage
        self.node_stage = stage.to(w.device)
        self.none = 2 * self.n_layers  # the start of a mask that ablates nothing
        self._basis: tuple[int, Tensor | None] = (-1, None)
        self.heads_linear = {L: self._heads_are_linear(L) for L, gs in self.by_layer.items() if "heads" in gs}

    # ---- set-up checks --------------------------------------------------------------------
    def _heads_are_linear(self, L: int) -> bool:
        """``attn_out = sum_h z_h W_O[h] + const`` on the clean run (what the head deltas assume)."""
        if not self.rp.staged[L]:
            return False
        g = self.by_layer[L]["heads"]
        attn_out = self.rp.mid(L) - self.rp.pre(L)
        diff = attn_out - g.out(self.part.clean_units[g.key]).sum(-2)
        dev = float((diff - diff.mean(dim=(0, 1), keepdim=True)).abs().max())
        rtol = max(1e-4, 8 * torch.finfo(attn_out.dtype).eps)  # half precision: its own rounding
        return dev <= rtol * (float(attn_out.abs().max()) or 1.0) + 1e-6

    def start(self, ablate: Bool[Tensor, "K N"]) -> Tensor:
        """First stage each mask ablates (``none``: nothing; ``-1``: an embedding or no fast path)."""
        big = torch.full_like(self.node_stage, self.none)
        first = torch.where(ablate, self.node_stage.unsqueeze(0), big.unsqueeze(0)).min(-1).values
        usable = torch.tensor([s == self.none or (s >= 0 and self.rp.usable_from(s // 2)) for s in first.tolist()],
                              dtype=torch.bool, device=first.device)
        return torch.where(usable, first, torch.full_like(first, -1))

    # ---- pieces -------------------------------------------------------------------------------
    def _mid_basis(self, L: int) -> Tensor:
        """``[H + 1, B*P*d]``: each head's ``(z'_h - z_h) W_O[h]``, then the clean ``mid`` (one layer cached)."""
        if self._basis[0] != L:
            g = self.by_layer[L]["heads"]
            clean = self.part.clean_units[g.key]                                         # [B, P, H, f]
            dz = (self.part.abl_units[g.key] - clean).expand_as(clean)
            per_head = torch.einsum("bphf,hfd->hbpd", dz, g.W_O).flatten(1)           # [H, B*P*d]
            self._basis = (L, torch.cat([per_head, self.rp.mid(L).reshape(1, -1)]))
        return self._basis[1]

    def _mid_with_heads(self, L: int, m: Tensor) -> Float[Tensor, "N P d"]:
        """``mid + sum_h mask_h (z'_h - z_h) W_O[h]`` for each mask, ``[K * B, P, d]``: one ``[K, H+1]`` product."""
        basis = self._mid_basis(L)
        coef = torch.cat([m.to(basis.dtype), torch.ones(m.shape[0], 1, dtype=basis.dtype, device=basis.device)], 1)
        mid = self.rp.mid(L)
        return (coef @ basis).view(m.shape[0] * mid.shape[0], *mid.shape[1:])

    def _unit_delta(self, g: SenderGroup, m: Tensor) -> Tensor:
        """``mask * (ablated - clean)`` of a one-unit group (MLP, block) as ``[N, P, d]``."""
        diff = (self.part.abl_units[g.key] - self.part.clean_units[g.key]).squeeze(-2)   # [B, P, d]
        diff = diff.expand(self.part.B, *diff.shape[1:])
        K = m.shape[0]
        out = m.to(diff.dtype).view(K, 1, 1, 1) * diff.unsqueeze(0)
        return out.reshape(K * self.part.B, *diff.shape[1:])

    # ---- the run -------------------------------------------------------------------------------
    def run(self, s: int, masks: Tensor) -> Float[Tensor, "N V"]:
        """Logits at the prediction positions, ``[K * B, V]``, for ``K`` masks whose first stage is ``s``
        (layer ``L = s // 2``; the patcher's chunk state, ``st.masks``, is set by the caller)."""
        st, rp = self.p._st, self.rp
        K, L = masks.shape[0], s // 2
        gs = self.by_layer.get(L, {})
        m = {kind: st.masks[g.i] for kind, g in gs.items()}
        heads, mlp, neurons, block = (m.get(k) for k in _FAST)
        last = L == self.n_layers - 1
        for g in gs.values():  # layer L is handled here, not by its hooks (re-enabled below for MLP re-runs)
            st.masks[g.i] = None
        if _other(m):  # a kind without a fast path here: block L re-run whole, its hooks ablating its nodes
            for kind, g in gs.items():
                st.masks[g.i] = m[kind]
            x = rp.blocks(_tile(rp.pre(L), K), L, K, L + 1)
        elif block is not None:
            x = _tile(rp.post(L), K) + self._unit_delta(gs["block"], block)
        elif (heads is not None and not self.heads_linear.get(L)) or (
                (mlp is not None or neurons is not None) and not rp.staged[L]):
            for kind, g in gs.items():  # re-run block L whole, its hooks ablating its nodes
                st.masks[g.i] = m[kind]
            x = rp.blocks(_tile(rp.pre(L), K), L, K, L + 1)
        elif heads is not None or neurons is not None:
            mid = self._mid_with_heads(L, heads) if heads is not None else _tile(rp.mid(L), K)
            if last and neurons is None:
                return self._mlp_at_pos(L, mid, mlp, K)
            if "mlp" in gs:
                st.masks[gs["mlp"].i] = mlp
            if "neurons" in gs:
                st.masks[gs["neurons"].i] = neurons
            x = rp.mlp_stage(L, mid, K)
        else:  # only the MLP of layer L
            x = _tile(rp.post(L), K) + self._unit_delta(gs["mlp"], mlp)
        if last:
            return rp.logits(rp.gather(x, self.pos))[:, 0]
        return self._finish(L + 1, x, K)

    def _mlp_at_pos(self, L: int, mid: Tensor, mlp: Tensor | None, K: int) -> Tensor:
        """The last block's MLP, the final norm and the unembedding at the prediction positions only;
        an ablated MLP is replaced by its ablated value there (its hook stays off)."""
        xp = self.rp.gather(mid, self.pos)
        out = self.rp.mlp_out(L, xp, K)
        if mlp is not None:
            abl = self.part.abl_units[self.by_layer[L]["mlp"].key].squeeze(-2)      # [B|1, P|1, d]
            abl = abl.expand(self.part.B, *abl.shape[1:])
            abl = abl if abl.shape[1] == 1 else self.rp.gather(abl, self.pos)
            rows = mlp[:, 0].repeat_interleave(self.part.B).view(-1, 1, 1)
            out = torch.where(rows, _tile(abl, K), out)
        return self.rp.logits(xp + out)[:, 0]

    def _finish(self, start: int, x: Tensor, K: int) -> Tensor:
        """Blocks ``start..`` (the last one's MLP at the prediction positions when possible)."""
        rp, st, last = self.rp, self.p._st, self.n_layers - 1
        gs = self.by_layer.get(last, {})
        neurons = st.masks[gs["neurons"].i] if "neurons" in gs else None
        if start > last:
            return rp.logits(rp.gather(x, self.pos))[:, 0]
        x = rp.blocks(x, start, K, last)
        if not rp.staged[last] or neurons is not None or _other({k: st.masks[g.i] for k, g in gs.items()}):
            return rp.logits(rp.gather(rp.blocks(x, last, K), self.pos))[:, 0]
        mid = rp.attn_stage(last, x, K)  # the last layer's heads ablated by their hooks
        mlp = None
        if "mlp" in gs:
            mlp, st.masks[gs["mlp"].i] = st.masks[gs["mlp"].i], None
        return self._mlp_at_pos(last, mid, mlp, K)


class EdgeSuffixRunner:
    """Edge masks from the first receiver they touch on (for :class:`~patching.exact.EdgePatcher`), one prompt batch.

    A receiver's *stage* is ``2L`` for the q/k/v inputs of layer ``L``'s heads, ``2L + 1`` for layer ``L``'s
    MLP and ``2 n_layers`` for the logits. A chunk of masks whose first stage is ``s`` starts from the clean
    residual stream entering that stage (block ``L``'s input, its ``mid`` or the last block's output), on
    ``K * B`` rows; senders upstream of ``s`` are not re-run (their difference is the clean one, which the
    patcher supplies once per chunk). With a base mask (:meth:`~patching.exact.EdgePatcher.based_on`) the stage
    is the first one where a mask differs from the base, and the run starts from the base run's residual stream
    there (its upstream senders' differences are then against the base run). Later senders and every receiver
    work through the usual hooks. The last
    block's MLP (when its stages replay) and the unembedding run at the prediction positions only; the MLP and
    logits receivers then read the sender differences there.
    """

    def __init__(self, patcher: Any, part: Part):
        self.p, self.part, self.rp = patcher, part, part.replay
        w, replay = patcher.wiring, part.replay
        n = replay.n_layers
        self.pos = part.batch.pos
        self.none = 2 * n + 1
        stage = torch.full((patcher.graph.n_edges,), -1, dtype=torch.long, device=w.device)
        for r in w.receivers:
            stage[r.edge_idx.flatten().to(w.device)] = 2 * n if r.layer is None else 2 * r.layer + r.stage
        self.edge_stage = stage
        self.stage_ok = [replay.usable_from(s // 2) and (s % 2 == 0 or replay.staged[s // 2])
                         for s in range(2 * n)] + [replay.logits_ok]
        self.base: tuple[Tensor, Any] | None = None  # (ablate [E], the base run's recording): EdgePatcher.based_on

    def start(self, ablate: Bool[Tensor, "K E"]) -> Tensor:
        """First receiver stage each mask touches (``none``: no edge; ``-1``: a whole forward)."""
        big = torch.full_like(self.edge_stage, self.none)
        if self.base is not None:  # relative to a base mask: the first stage where the mask differs from it
            ablate = ablate ^ self.base[0].to(ablate.device).unsqueeze(0)
        first = torch.where(ablate, self.edge_stage.unsqueeze(0), big.unsqueeze(0)).min(-1).values
        ok = torch.tensor([s == self.none or (s >= 0 and self.stage_ok[s]) for s in first.tolist()],
                          dtype=torch.bool, device=first.device)
        return torch.where(ok, first, torch.full_like(first, -1))

    def _logits_from(self, x: Tensor, L0: int, K: int) -> Tensor:
        """Logits at the prediction positions from the residual stream ``x`` entering block ``L0``."""
        rp, last = self.rp, self.rp.n_layers - 1
        if L0 > last:
            return rp.logits(rp.gather(x, self.pos))[:, 0]
        x = rp.blocks(x, L0, K, last)
        if rp.staged[last]:
            mid = rp.attn_stage(last, x, K)
            return rp.logits(rp.mlp_stage(last, rp.gather(mid, self.pos), K))[:, 0]
        return rp.logits(rp.gather(rp.blocks(x, last, K), self.pos))[:, 0]

    def run(self, s: int, masks: Tensor) -> Float[Tensor, "N V"]:
        """Logits at the prediction positions, ``[K * B, V]``, for masks whose first stage is ``s``."""
        rp, n, K = self.rp, self.rp.n_layers, masks.shape[0]
        src = rp if self.base is None else self.base[1]  # the residual stream the stage starts from
        if s == 2 * n:
            return self._logits_from(_tile(src.post(n - 1), K), n, K)
        L = s // 2
        if s % 2 == 0:
            return self._logits_from(_tile(src.pre(L), K), L, K)
        if L == n - 1:  # the last MLP: at the prediction positions only
            return rp.logits(rp.mlp_stage(L, rp.gather(_tile(src.mid(L), K), self.pos), K))[:, 0]
        return self._logits_from(rp.mlp_stage(L, _tile(src.mid(L), K), K), L + 1, K)


__all__ = ["SuffixRunner", "EdgeSuffixRunner"]
