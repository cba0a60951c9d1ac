"""Re-run the suffix of a clean forward: the engine's way of not recomputing what an ablation cannot change.

An ablation at layer ``L`` leaves the residual stream before it untouched, and the metric reads the
logits at one position per prompt. :class:`Replay` records, in the clean forward, how every block
(and its norm / attention / MLP stages) was called: the positional and keyword arguments, with the
attention mask, the rotary ``position_embeddings`` and the like. It then re-executes only what an
ablation changes, on ``K * B`` rows:

* :meth:`blocks` runs blocks ``start..`` from a given residual stream, with each block's recorded
  arguments tiled to ``K`` copies of the batch (a KV cache is dropped; ``use_cache`` is off);
* :meth:`mlp_stage` / :meth:`attn_stage` run one stage of a block (``mid = pre + attn(ln1(pre))``,
  ``post = mid + mlp(ln2(mid))``), so that an ablation of a head re-runs its own layer's MLP but not its
  attention, and the last block's MLP runs at the prediction position only;
* :meth:`logits` applies the final norm and the unembedding at the prediction positions only.

Nothing here assumes an architecture: :meth:`Replay.verify` checks each re-execution against the
recorded clean forward and switches off what does not reproduce it (``block_ok`` / ``staged``), and the
engine falls back to whole forward passes for the rest. TransformerLens hooks fire as usual inside the
re-executed modules, so hook-based interventions on later layers keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

log = logging.getLogger(__name__)

try:  # transformers' KV-cache base class (dropped on replay)
    from transformers.cache_utils import Cache as _HFCache
except Exception:  # pragma: no cover - transformers always present in practice
    _HFCache = ()


@dataclass
class _Call:
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    out: Any = None

    def hidden(self) -> Tensor:
        x = self.args[0] if self.args else self.kwargs.get("hidden_states")
        if not isinstance(x, Tensor):
            raise TypeError("the recorded call has no hidden-state tensor")
        return x


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Replay:
    """Records one clean forward (see the module docstring) and re-runs parts of it on ``K * B`` rows.

    Use :meth:`recording` around the clean forward, then :meth:`verify` once; ``block_ok[L]`` says
    block ``L`` can be re-run whole, ``staged[L]`` that its attention and MLP stages can be re-run apart,
    ``logits_ok`` that the final norm and unembedding reproduce the model's logits.
    """

    def __init__(self, model: Any, B: int):
        self.model, self.B = model, B
        blocks = getattr(model, "blocks", None)
        self.n_layers = len(blocks) if blocks is not None else 0
        self.calls: dict[tuple[int, str], _Call] = {}
        self.block_ok = [False] * self.n_layers
        self.staged = [False] * self.n_layers
        self.logits_ok = False
        self._tiled: dict[tuple[int, str, int], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    # ---- recording ------------------------------------------------------------------------
    def _modules(self) -> Iterator[tuple[tuple[int, str], Any]]:
        for L, blk in enumerate(self.model.blocks):
            yield (L, "block"), blk
            for part in ("ln1", "attn", "ln2", "mlp"):
                if hasattr(blk, part):
                    yield (L, part), getattr(blk, part)

    @contextmanager
    def recording(self):
        """Record every block's (and stage's) call during the forward run inside the ``with``."""
        handles = []
        try:
            if self.n_layers and hasattr(self.model, "ln_final") and hasattr(self.model, "unembed"):
                for key, mod in self._modules():
                    def pre(m: Any, args: tuple, kwargs: dict, _k: tuple = key) -> None:
                        if _k in self.calls:  # the first call (the forward's own) only
                            return
                        keep = _k[1] in ("block", "ln2")  # block inputs and ``mid`` are kept; other inputs
                        if args and isinstance(args[0], Tensor):  # are replaced on replay, so not stored
                            args = (args[0].detach().clone() if keep else None, *args[1:])
                        elif not keep:
                            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                        self.calls[_k] = _Call(args, dict(kwargs))

                    def post(m: Any, args: tuple, kwargs: dict, out: Any, _k: tuple = key) -> None:
                        if _k[1] == "block" and self.calls[_k].out is None:
                            self.calls[_k].out = _first(out).detach().clone()
                    handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(mod.register_forward_hook(post, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    # ---- tiling -----------------------------------------------------------------------------
    def _tile(self, x: Any, K: int) -> Any:
        if isinstance(x, Tensor):
            return x.repeat(K, *([1] * (x.dim() - 1))) if x.dim() >= 2 and x.shape[0] == self.B and K > 1 else x
        if _HFCache and isinstance(x, _HFCache):
            return None
        if isinstance(x, tuple):
            return tuple(self._tile(y, K) for y in x)
        if isinstance(x, list):
            return [self._tile(y, K) for y in x]
        return x

    def _call_args(self, L: int, part: str, K: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        key = (L, part, K)
        if key not in self._tiled:
            if any(k[2] != K for k in self._tiled):  # keep one chunk size's tiled arguments (memory)
                self._tiled.clear()
            c = self.calls[(L, part)]
            args = tuple(self._tile(a, K) for a in c.args[1:])
            kwargs = {k: self._tile(v, K) for k, v in c.kwargs.items() if k != "hidden_states"}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self._tiled[key] = (args, kwargs)
        return self._tiled[key]

    def _call(self, L: int, part: str, x: Tensor, K: int) -> Tensor:
        args, kwargs = self._call_args(L, part, K)
        mod = self.model.blocks[L] if part == "block" else getattr(self.model.blocks[L], part)
        return _first(mod(x, *args, **kwargs))

    # ---- re-execution -------------------------------------------------------------------------
    def pre(self, L: int) -> Float[Tensor, "B P d"]:
        """The clean residual stream entering block ``L``."""
        return self.calls[(L, "block")].hidden()

    def post(self, L: int) -> Float[Tensor, "B P d"]:
        """The clean residual stream leaving block ``L``."""
        return _first(self.calls[(L, "block")].out)

    def mid(self, L: int) -> Float[Tensor, "B P d"]:
        """The clean residual stream between block ``L``'s attention and MLP (``ln2``'s input)."""
        return self.calls[(L, "ln2")].hidden()

    def blocks(self, x: Float[Tensor, "N P d"], start: int, K: int, stop: int | None = None) -> Float[Tensor, "N P d"]:
        """Blocks ``start .. stop-1`` (default: to the end) on ``x`` (``K`` copies of the batch)."""
        for L in range(start, self.n_layers if stop is None else stop):
            x = self._call(L, "block", x, K)
        return x

    def attn_stage(self, L: int, x: Float[Tensor, "N P d"], K: int) -> Float[Tensor, "N P d"]:
        """``x + attn(ln1(x))`` of block ``L`` (needs ``staged[L]``)."""
        return x + self._call(L, "attn", self._call(L, "ln1", x, K), K)

    def mlp_stage(self, L: int, x: Float[Tensor, "N Q d"], K: int) -> Float[Tensor, "N Q d"]:
        """``x + mlp(ln2(x))`` of block ``L``; position-wise, so ``x`` may hold a subset of positions."""
        return x + self.mlp_out(L, x, K)

    def mlp_out(self, L: int, x: Float[Tensor, "N Q d"], K: int) -> Float[Tensor, "N Q d"]:
        """``mlp(ln2(x))`` of block ``L``."""
        return self._call(L, "mlp", self._call(L, "ln2", x, K), K)

    def gather(self, x: Float[Tensor, "N P d"], pos: Int[Tensor, " B"]) -> Float[Tensor, "N 1 d"]:
        """``x`` at each row's prediction position (``pos`` repeats over the ``N // B`` copies)."""
        K = x.shape[0] // pos.shape[0]
        idx = pos.repeat(K).view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        return x.gather(1, idx)

    def logits(self, x: Float[Tensor, "N Q d"]) -> Float[Tensor, "N Q V"]:
        """Final norm and unembedding of ``x`` (the residual stream after the last block)."""
        return self.model.unembed(self.model.ln_final(x))

    # ---- verification ---------------------------------------------------------------------------
    def verify(self, clean_logits: Float[Tensor, "B V"], pos: Int[Tensor, " B"], *, rtol: float = 1e-4) -> None:
        """Check every re-execution against the recorded clean forward (on two tiled copies)."""
        if not self.n_layers or any((L, "block") not in self.calls for L in range(self.n_layers)):
            log.info("replay: blocks were not recorded; the engine runs whole forwards")
            return

        rtol = max(rtol, 4 * torch.finfo(clean_logits.dtype).eps)  # half precision: its own rounding

        def close(a: Tensor, b: Tensor) -> bool:
            if a.shape != b.shape:
                return False
            scale = float(b.abs().max()) or 1.0
            return float((a - b).abs().max()) <= rtol * scale + 1e-6

        def two(t: Tensor) -> Tensor:
            return t.repeat(2, *([1] * (t.dim() - 1)))

        try:
            with torch.no_grad():
                last = self.post(self.n_layers - 1)
                self.logits_ok = close(self.logits(self.gather(two(last), pos))[:, 0], two(clean_logits))
                for L in range(self.n_layers):
                    self.block_ok[L] = close(self.blocks(two(self.pre(L)), L, 2, L + 1), two(self.post(L)))
                    if all((L, p) in self.calls for p in ("ln1", "attn", "ln2", "mlp")):
                        mid = self.attn_stage(L, two(self.pre(L)), 2)
                        self.staged[L] = (close(mid, two(self.mid(L)))
                                          and close(self.mlp_stage(L, two(self.mid(L)), 2), two(self.post(L))))
        except Exception as e:  # an architecture whose calls cannot be replayed: whole forwards
            log.info("replay: re-execution failed (%s: %s); the engine runs whole forwards", type(e).__name__, e)
            self.block_ok = [False] * self.n_layers
            self.staged = [False] * self.n_layers
            self.logits_ok = False
        self._tiled.clear()
        log.debug("replay: logits %s, blocks %s, staged %s", self.logits_ok, self.block_ok, self.staged)

    def adopt(self, other: Replay) -> None:
        """Take the verdicts of ``other``, a verified recording of the same model's calls on other prompts."""
        self.block_ok, self.staged, self.logits_ok = list(other.block_ok), list(other.staged), other.logits_ok

    def usable_from(self, L: int) -> bool:
        """Whether blocks ``L..`` and the logits can all be re-run."""
        return self.logits_ok and all(self.block_ok[L:])


__all__ = ["Replay"]
