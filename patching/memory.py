"""How much memory a batched patching forward needs, and how many masks and prompts fit a budget.

The patchers run ``K`` masks over a prompt batch of ``b`` prompts of ``P`` positions as one forward on
``K * b`` rows. Under ``torch.no_grad`` a forward frees each layer's temporaries before the next layer, so
its peak is one layer's working set per row plus what the engine itself holds for the chunk:

* per mask and prompt row, the activations of one layer (:meth:`MemoryModel.row_bytes`): the residual
  stream and its copies, q/k/v and the attention scores (``H * P`` per position), the MLP hidden layer, and
  for edge runs the per-head receiver inputs (``x + delta_h`` for every head of one q/k/v group, the
  projected path's largest temporary, or the split path's per-head forks); plus the next-token logits at
  the prediction position (whole forwards: at every position) and their float32 copy for the metric;
* for edge runs the sender differences ``ablated - current`` (:mod:`patching.exact`): ``A`` of them per
  mask for the senders that are re-run in this chunk and used by some mask (``D [K, A, b, P, d]``), and
  ``U`` shared by every mask for the used senders upstream of the chunk's first receiver, which are not
  re-run and whose difference is the clean one (``Dc [U, b, P, d]``).

So a chunk of ``K`` edge masks needs ``U * c + K * (A * c + b * row)`` bytes (``c`` = one sender's
difference over the prompt batch) and a chunk of node masks ``K * b * row``. The constants are upper
bounds of what the forward allocates (checked against the measured peak resident memory in
``tests/test_engine_memory.py``). What the patcher keeps between runs (clean and ablated sender
activations and the replay's block inputs, about ``(4 L + 2) * P * d`` numbers per prompt) is not part of
the per-forward budget; see docs/engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MemoryModel:
    """Byte counts of one batched forward (module docstring); built by :meth:`from_graph`."""

    elt: int          # bytes per number in the model's dtype
    d: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_senders: int
    n_layers: int
    edges: bool       # edge runs: receiver inputs per head
    split: bool       # split q/k/v path (per-head residual forks)

    @classmethod
    def from_graph(cls, graph: Any, dtype: torch.dtype, *, edges: bool, split: bool) -> MemoryModel:
        m = graph.meta
        return cls(elt=torch.finfo(dtype).bits // 8, d=int(m["d_model"]), n_heads=max(int(m.get("n_heads") or 0), 1),
                   d_mlp=max(int(m.get("d_mlp") or 0), int(m["d_model"])), d_vocab=int(m["d_vocab"]),
                   n_senders=len(graph.senders), n_layers=int(m["n_layers"]), edges=edges, split=split)

    def row_bytes(self, P: int, *, whole: bool = False) -> int:
        """One prompt row of one mask: a layer's working set over ``P`` positions and the logits."""
        d, H = self.d, self.n_heads
        per_pos = 16 * d + 4 * H * P + 4 * self.d_mlp
        if self.edges:
            per_pos += (8 * H * d) if self.split else (3 * H * d)
        logits = self.d_vocab * (P if whole else 1)
        masks = self.n_layers * P * P  # each layer's attention mask, tiled to the chunk and kept for it
        return self.elt * (P * per_pos + 2 * logits + masks) + 4 * self.d_vocab

    def diff_bytes(self, b: int, P: int) -> int:
        """One sender's residual-stream difference over ``b`` prompts of ``P`` positions."""
        return self.elt * b * P * self.d

    def edge_chunk(self, K: int, A: int, U: int, b: int, P: int, *, whole: bool = False) -> int:
        """Bytes of ``K`` edge masks with ``A`` re-run and ``U`` upstream used senders (module docstring)."""
        return U * self.diff_bytes(b, P) + K * (A * self.diff_bytes(b, P) + b * self.row_bytes(P, whole=whole))

    def node_chunk(self, K: int, b: int, P: int, *, whole: bool = False) -> int:
        return K * b * self.row_bytes(P, whole=whole)

    def worst_mask(self, b: int, P: int) -> int:
        """An upper bound for one mask over ``b`` prompts: every sender's difference, a whole forward."""
        if self.edges:
            return self.edge_chunk(1, self.n_senders, 0, b, P, whole=True)
        return self.node_chunk(1, b, P, whole=True)

    def prompt_batch(self, B: int, P: int, max_bytes: int) -> int:
        """The largest prompt batch (``<= B``) whose worst single mask fits ``max_bytes`` (0: not even one)."""
        one = self.worst_mask(1, P)
        return min(B, max_bytes // max(one, 1))


def fmt_bytes(n: float) -> str:
    """``1.5 GiB`` / ``512 MiB`` / ``12 KiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


__all__ = ["MemoryModel", "fmt_bytes", "peak_rss_bytes", "reset_peak_rss"]
