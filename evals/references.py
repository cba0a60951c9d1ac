"""Reference (ground-truth) circuits for models whose mechanism is known.

A :class:`ReferenceCircuit` is a set of engine edge ids (``a0.h1->a1.h2<k>``) and the node ids they touch.
:func:`reference_for` returns the reference of a model by name, or ``None`` when there is none:

* ``attn2l-induction`` (and any model with an induction mechanism): :func:`induction_reference`, the
  induction circuit of Olsson et al. 2022 ("In-context Learning and Induction Heads"; Elhage et al. 2021,
  "A Mathematical Framework for Transformer Circuits"), with the heads *measured* from attention patterns.
* ``tracr-reverse``, ``tracr-frac_prevs``: exact by construction, derived from the compiled weights by
  :func:`evals.tracr_circuits.tracr_reference`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceCircuit:
    """A ground-truth circuit.

    Attributes:
        edges: engine edge ids in the circuit.
        nodes: node ids in the circuit (every endpoint of ``edges``, plus any node-only members).
        source: how it was obtained (for reports).
        details: measured numbers behind it (head scores ...), scalars or strings only.
    """

    edges: tuple[str, ...]
    nodes: tuple[str, ...]
    source: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_edges(cls, edges: list[str] | tuple[str, ...], source: str = "",
                   details: dict[str, Any] | None = None) -> ReferenceCircuit:
        edges = tuple(sorted(set(edges)))
        nodes = sorted({n for e in edges for n in edge_endpoints(e)})
        return cls(edges=edges, nodes=tuple(nodes), source=source, details=dict(details or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "nodes": list(self.nodes), "source": self.source,
                "details": dict(self.details)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceCircuit:
        return cls(edges=tuple(d["edges"]), nodes=tuple(d["nodes"]), source=d.get("source", ""),
                   details=dict(d.get("details", {})))

    def check(self, graph: Any) -> None:
        """Raise ``ValueError`` naming the first edge / node that is not in ``graph`` (a ComponentGraph)."""
        for e in self.edges:
            if e not in graph.edge_index:
                raise ValueError(f"reference circuit ({self.source}): edge {e!r} is not in the model's graph")
        for n in self.nodes:
            if n not in graph.node_index:
                raise ValueError(f"reference circuit ({self.source}): node {n!r} is not in the model's graph")


def edge_endpoints(edge_id: str) -> tuple[str, str]:
    """``"a0.h1->a1.h2<k>"`` -> ``("a0.h1", "a1.h2")``."""
    if "->" not in edge_id:
        raise ValueError(f"bad edge id {edge_id!r}: expected 'sender->receiver' or 'sender->receiver<q|k|v>'")
    sender, receiver = edge_id.split("->", 1)
    return sender, receiver.split("<", 1)[0]


def head_id(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def _repeated_tokens(model: Any, n: int, half: int, seed: int) -> torch.Tensor:
    """``[n, 1 + 2*half]``: BOS, ``half`` distinct random non-special tokens, the same tokens again."""
    tok = getattr(model, "tokenizer", None)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    allowed = torch.tensor([t for t in range(int(model.cfg.d_vocab)) if t not in special])
    if len(allowed) < half:
        raise ValueError(f"induction reference: the vocabulary has {len(allowed)} ordinary tokens, need {half}")
    g = torch.Generator().manual_seed(seed)
    rand = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:half]] for _ in range(n)])
    bos = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else int(allowed[0])
    return torch.cat([torch.full((n, 1), bos), rand, rand], dim=1)


def head_scores(model: Any, tokens: torch.Tensor | None = None, last: torch.Tensor | None = None, *,
                n: int = 32, half: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Previous-token and induction scores of every head, ``[n_layers, n_heads]`` each.

    On ``tokens [N, P]`` (positions after ``last [N]`` are padding and ignored; default: ``n`` sequences
    BOS + A + A of ``half`` distinct random tokens): the previous-token score is the mean attention from
    position ``t`` to ``t - 1`` over ``t >= 2`` (so BOS is never the target); the induction score is the mean
    attention from every position ``t`` whose token occurred before, at ``j`` (the latest such), to ``j + 1``,
    the token that followed it (Olsson et al. 2022), over the positions with ``j + 1 < t``.
    """
    if tokens is None:
        tokens = _repeated_tokens(model, n, half, seed)
    n_rows, seq = tokens.shape
    last = torch.full((n_rows,), seq - 1) if last is None else last.cpu()
    tokens = tokens.to(next(model.parameters()).device)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    idx = torch.arange(seq)
    real = idx[None, :] <= last[:, None]  # [N, P]
    toks = tokens.cpu()
    earlier = (toks[:, :, None] == toks[:, None, :]) & (idx[None, None, :] < idx[None, :, None])  # [N, t, j]
    j = torch.where(earlier, idx[None, None, :], torch.full_like(earlier, -1, dtype=torch.long)).amax(-1)
    target = (j + 1).clamp(min=0)
    ind_ok = real & (j >= 0) & (target < idx[None, :])
    prev_ok = real & (idx[None, :] >= 2)
    if not bool(ind_ok.any()):
        raise ValueError("induction reference: the prompts contain no repeated token to measure induction on")
    prev, ind = [], []
    for name in names:
        pat = cache[name].float().cpu()  # [N, H, Q, K]
        to_prev = pat[:, :, idx[1:], idx[:-1]]  # [N, H, P-1]: attention from t to t-1, t >= 1
        to_prev = torch.cat([torch.zeros_like(pat[:, :, :1, 0]), to_prev], dim=-1)  # index by t
        to_ind = pat.gather(-1, target[:, None, :, None].expand(-1, pat.shape[1], -1, 1)).squeeze(-1)  # [N, H, P]
        prev.append((to_prev * prev_ok[:, None]).sum((0, 2)) / prev_ok.sum())
        ind.append((to_ind * ind_ok[:, None]).sum((0, 2)) / ind_ok.sum())
    return {"prev_token": torch.stack(prev), "induction": torch.stack(ind)}


def induction_reference(model: Any, graph: Any | None = None, batch: Any | None = None, *, min_score: float = 0.4,
                        include_query: bool = False, n: int = 32, half: int = 12, seed: int = 0) -> ReferenceCircuit:
    """The induction circuit of ``model`` from its measured attention patterns (Olsson et al. 2022).

    Heads: previous-token heads are the heads with previous-token score ``>= min_score``; induction heads
    are the heads in later layers with induction score ``>= min_score`` (:func:`head_scores`, measured on
    ``batch.clean`` when a TaskBatch is given, else on random repeated sequences). Edges:

    * ``embed -> prev<v>``: the previous-token head copies the previous token's identity (its OV circuit);
    * ``prev -> ind<k>``: K-composition, the induction head's key is "my previous token was X";
    * ``embed -> ind<v>``: the value copies the token after the earlier occurrence, the prediction;
    * ``ind -> logits``: the induction head writes the prediction (direct path);
    * with ``include_query=True`` also ``embed -> ind<q>``: the query is the current token.

    The reference is the circuit through which the *clean/corrupt difference* of the induction task flows
    (the same notion as the tracr task circuits), because that is all an ablation-based method can see:
    the corrupted prompt replaces the first copy of the repeated words, so the current token (the query
    at the prediction position) is identical in both runs: by default there are no ``embed -> ind<q>``
    edges (under resample ablation they score exactly 0 for every method). The previous-token head's q/k
    inputs are left out because its pattern is positional (the tokens only modulate it), and residual
    paths through MLPs because the zoo model is attention-only. Raises ``ValueError`` when no previous-token or
    induction head reaches ``min_score`` or an edge is missing from ``graph``.
    """
    if batch is not None:
        scores = head_scores(model, batch.clean, batch.pos)
    else:
        scores = head_scores(model, n=n, half=half, seed=seed)
    prev_s, ind_s = scores["prev_token"], scores["induction"]
    prev_heads = [(int(l_), int(h)) for l_, h in (prev_s >= min_score).nonzero().tolist()]
    if not prev_heads:
        best = divmod(int(prev_s.argmax()), prev_s.shape[1])
        raise ValueError(f"induction reference: no previous-token head scores >= {min_score} "
                         f"(best {head_id(*best)} = {float(prev_s.max()):.2f})")
    first = min(l_ for l_, _ in prev_heads)
    ind_heads = [(int(l_), int(h)) for l_, h in (ind_s >= min_score).nonzero().tolist() if l_ > first]
    if not ind_heads:
        raise ValueError(f"induction reference: no induction head after layer {first} scores >= {min_score} "
                         f"(best {float(ind_s[first + 1:].max()) if first + 1 < len(ind_s) else 0:.2f})")
    edges = [f"embed->{head_id(*p)}<v>" for p in prev_heads]
    for i in ind_heads:
        ih = head_id(*i)
        edges += [f"embed->{ih}<v>", f"{ih}->logits"] + ([f"embed->{ih}<q>"] if include_query else [])
        edges += [f"{head_id(*p)}->{ih}<k>" for p in prev_heads if p[0] < i[0]]
    details: dict[str, Any] = {"min_score": min_score, "include_query": include_query,
                               "prev_token_heads": ",".join(head_id(*p) for p in prev_heads),
                               "induction_heads": ",".join(head_id(*i) for i in ind_heads)}
    for l_ in range(prev_s.shape[0]):
        for h in range(prev_s.shape[1]):
            details[f"prev_score_{head_id(l_, h)}"] = round(float(prev_s[l_, h]), 4)
            details[f"induction_score_{head_id(l_, h)}"] = round(float(ind_s[l_, h]), 4)
    ref = ReferenceCircuit.from_edges(edges, source="induction mechanism (Olsson et al. 2022), heads measured "
                                      "from attention patterns", details=details)
    if graph is not None:
        ref.check(graph)
    log.info("induction reference: prev-token %s, induction %s", details["prev_token_heads"],
             details["induction_heads"])
    return ref


INDUCTION_MODELS = ("attn2l-induction",)


def reference_for(model_name: str, model: Any, graph: Any | None = None, batch: Any | None = None, *,
                  ablation: str = "resample", kind: str = "auto") -> ReferenceCircuit | None:
    """The reference circuit of ``model_name`` (``None`` if it has none).

    tracr models: the reference follows the ablation (:func:`evals.tracr_circuits.reference_kind`): under
    zero ablation the program circuit, under resample / mean the task circuit (the edges that carry a
    difference between ``batch``'s clean and corrupted prompts); ``kind`` (``program`` / ``task``) overrides.
    """
    from evals.tracr_models import is_tracr_name

    if is_tracr_name(model_name):
        from evals.tracr_circuits import reference_kind, tracr_reference

        k = reference_kind(ablation, kind)
        return tracr_reference(model, graph, batch=batch if k == "task" else None, kind=k)
    if model_name in INDUCTION_MODELS:
        return induction_reference(model, graph, batch)
    return None
