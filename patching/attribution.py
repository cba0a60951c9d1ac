"""Gradient attribution: AtP for nodes and neurons, EAP and EAP-IG for edges (optionally with AtP*'s QK fix).

All three estimate the same quantity as exact patching, ``m(ablated) - m(clean)`` averaged over the
prompts, and return the same :class:`patching.scores.Scores`:

* **AtP** (attribution patching; Nanda 2022, Kramar et al. 2024 "AtP*"): first-order Taylor
  expansion around the clean run, ``score(u) = sum_{b,p} (ablated_u - clean_u) . dm/d act_u / B``,
  one forward + one backward with a zero probe added at every sender activation.
* **EAP** (edge attribution patching; Syed, Rager & Conmy 2023): ``score(s -> r) =
  sum_{b,p} (ablated_s - clean_s) . dm/d input_r / B`` with the gradient taken at the receiver's input
  (per head and per q/k/v input), i.e. the derivative of exactly the quantity edge patching moves.
  Two forwards (ablation capture; clean with gradients) and one backward; all edges of a receiver
  group at once by one matrix product, computed as the backward pass reaches the group (the gradient is
  then freed).
* **EAP-IG** (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness"): EAP with the
  gradient averaged over ``steps`` points on the straight line between the ablated and the clean
  input embeddings, ``x(a) = x_abl + a (x_clean - x_abl)`` for ``a = k/steps, k = 1..steps`` (a right
  Riemann sum: ``steps=1`` is EAP; the authors' code uses ``k = 0..steps-1``). The embeddings are
  the ``embed`` and ``pos_embed`` senders, whose ablated values follow the chosen ablation.
* ``qk_fix=True`` (EAP, EAP-IG): AtP*'s fix for saturated attention (``patching/qkfix.py``): an edge into a
  head's query or key is scored by the exact change of that head's attention pattern times the gradient
  at the pattern, instead of a linearised softmax.

Prompt batches (``prompt_batch``; ``patching/parts.py``): each batch runs its own forwards and backwards and
adds ``gradient . difference`` to the scores, which are divided by the total number of prompts at the end,
so memory is bounded by the prompt batch. A mean ablation is over all prompts (one extra clean forward per
batch when there are several). Metrics and score sums are float32 whatever the model's dtype.

Metrics whose gradient is uninformative are refused up front (:func:`check_gradient_metric`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from patching.ablation import Ablator, bos_token_id, check_ablation, trimmed
from patching.batch import TaskBatch
from patching.graph import ComponentGraph
from patching.metrics import Metric
from patching.parts import check_prompt_batch, prompt_slices
from patching.patcher import resolve_metric
from patching.qkfix import QKFix
from patching.scores import Scores, unit_ids
from patching.wiring import Hook, Wiring, forward_logits, prepared

GRADIENT_METHODS = ("atp", "eap", "eap_ig")
_METHOD_ALIASES = {"node_atp": "atp", "node-atp": "atp", "eap-ig": "eap_ig"}


def check_gradient_metric(method: str, metric: str, *, steps: int | None = None) -> None:
    """Refuse, in one line, a metric whose gradient-based scores would be meaningless (cheap, model-free).

    * ``accuracy`` is piecewise constant (an arg-max): its gradient is zero almost everywhere and
      undefined elsewhere, so AtP / EAP / EAP-IG cannot use it (exact patching can).
    * ``kl`` (KL(clean || patched)) is 0 at the clean run *and* minimal there, so its gradient at the
      clean run is exactly zero: AtP and EAP, which read the gradient only there, would return scores of
      about 1e-9 and rank units by float noise. EAP-IG reads the gradient at ``alpha = k / steps`` of the
      way from the ablated to the clean input (``k = 1..steps``); every point but the last is away from
      the clean run, where KL has a gradient, and the path integral estimates ``KL(ablated) - 0`` (the
      completeness of integrated gradients), so KL is allowed for EAP-IG with ``steps >= 2`` (tested: its
      scores agree with exact KL patching in rank) and refused with ``steps == 1`` (which is EAP).

    ``method`` is an engine name (``atp``, ``eap``, ``eap_ig``) or a CLI alias (``eap-ig``, ``node-atp``);
    other methods (exact patching, ACDC, ...) accept every metric and return without a check. Custom
    metric callables cannot be checked: pass their name only if it is one of ``METRICS``.
    """
    from patching.metrics import METRICS

    m = _METHOD_ALIASES.get(method, method)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    if m not in GRADIENT_METHODS:
        return
    if metric == "accuracy":
        raise ValueError(f"method {method!r} needs gradients, and metric 'accuracy' is not differentiable "
                         f"(an arg-max); use logit_diff or prob_diff, or an exact method")
    if metric == "kl" and (m != "eap_ig" or (steps is not None and steps < 2)):
        how = f"{method!r} with steps={steps}" if m == "eap_ig" else repr(method)
        raise ValueError(f"method {how} reads the gradient of metric 'kl' only at the clean run, where it is "
                         f"exactly zero (the scores would be float noise); use logit_diff or prob_diff, or "
                         f"eap-ig with steps >= 2")


class _Setup:
    """Wiring, prompt batches and ablation of one attribution call."""

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, ablation: str, metric: str | Metric,
                 reference: TaskBatch | None, per_position: bool, *, edges: bool, prompt_batch: int | None,
                 mean_include_bos: bool):
        check_ablation(ablation)
        check_prompt_batch(prompt_batch, "attribution")
        self.model, self.ablation, self.metric = model, ablation, metric
        self.wiring = Wiring(model, graph)
        self.batch = batch.to(self.wiring.device)
        self.split = edges and self.wiring.needs_split()
        self.ungroup = edges and self.wiring.ungroup
        self.forward_passes = 0
        self.metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)
        self.slices = prompt_slices(len(self.batch), prompt_batch)
        self.ablator = Ablator(self.wiring, ablation, reference=reference, per_position=per_position,
                               bos=bos_token_id(model), include_bos=mean_include_bos, prompt_batch=prompt_batch)
        self._fitted = False

    def prepared(self):
        return prepared(self.model, split_qkv=self.split, ungroup=self.ungroup)

    def parts(self):
        for rows in self.slices:
            yield trimmed(self.batch[rows])

    def fit(self) -> None:
        """Means over every prompt before the per-batch passes when they cannot come from one batch's capture."""
        if self.ablation != "mean" or self._fitted:
            return
        if self.ablator.reference is not None or len(self.slices) > 1:
            with torch.no_grad(), self.prepared():
                stores = []
                if self.ablator.reference is None:
                    for sub in self.parts():
                        stores.append((sub, self.wiring.capture(sub.clean, logits=False)[1]))
                        self.forward_passes += 1
                self.forward_passes += self.ablator.fit(stores)
            self._fitted = True

    def values(self, sub: TaskBatch, clean: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad(), self.prepared():
            if self.ablation == "mean" and not self._fitted:  # one prompt batch: its own capture
                self.ablator.fit([(sub, clean)])
                self._fitted = True
            abl, runs = self.ablator.values(sub, clean)
        self.forward_passes += runs
        return abl

    def capture(self, sub: TaskBatch, extra: list[Hook] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Clean forward without gradients: logits at pos and every sender's units."""
        store: dict[str, Tensor] = {}
        scratch: dict[str, Tensor] = {}
        with torch.no_grad(), self.prepared():
            logits = forward_logits(self.model, self.wiring.graph.meta, sub.clean,
                                    self.wiring.capture_hooks(store, scratch) + (extra or []), pos=sub.pos)
        self.forward_passes += 1
        return logits, store


def _probe_hooks(setup: _Setup, *, record: dict[str, Tensor] | None, sender_probes: dict[str, Tensor] | None,
                 receiver_probes: dict[str, Tensor] | None, alpha: float | None = None,
                 abl: dict[str, Tensor] | None = None, on_grad: Any = None) -> list[Hook]:
    """Hooks of a gradient pass: record clean sender units, interpolate the embeddings (EAP-IG), add zero probes
    at sender activations (AtP) or receiver inputs (EAP; ``on_grad(receiver group, gradient)`` sees each receiver
    input's gradient during the backward pass)."""
    w = setup.wiring
    scratch: dict[str, Tensor] = {}
    hooks: list[Hook] = w.ln_hooks(scratch)

    def sender_fn(g):
        def fn(x: Tensor, hook: Any) -> Tensor | None:
            blk = scratch.get(g.in_hook) if g.in_hook else None
            u = g.units(x, blk)
            if record is not None:
                record[g.key] = u.detach().clone()
            changed = False
            if alpha is not None and g.is_input:  # the model inputs (patching/kinds.py: is_input)
                a = abl[g.key]
                u = a + alpha * (u - a)
                changed = True
            if sender_probes is not None:
                probe = torch.zeros_like(u, requires_grad=True)
                sender_probes[g.key] = probe
                u = u + probe
                changed = True
            return g.from_units(u, blk) if changed else None
        return fn

    def receiver_fn(r):
        def fn(x: Tensor, hook: Any) -> Tensor:
            # a zero probe [1, R, rows, d] without the memory: a [1, R, 1, d] leaf expanded over the rows; the
            # gradient with respect to the expanded view (every row) goes to on_grad during the backward pass
            base = torch.zeros(1, r.R, 1, w.d_model, dtype=w.dtype, device=x.device, requires_grad=True)
            probe = base.expand(1, r.R, x.shape[0] * x.shape[1], w.d_model)
            if on_grad is not None:
                probe.register_hook(lambda g, _r=r: on_grad(_r, g))
            receiver_probes[r.key] = base
            return r.apply(x, probe, scratch.get(r.ln_hook) if r.ln_hook else None)
        return fn

    if record is not None or sender_probes is not None or alpha is not None:
        hooks += [(g.hook, sender_fn(g)) for g in w.senders]
    if receiver_probes is not None:
        hooks += [(r.hook, receiver_fn(r)) for r in w.receivers]
    return hooks


def _logits_at_pos(setup: _Setup, sub: TaskBatch, hooks: list[Hook]) -> Tensor:
    """Next-token logits at ``pos`` of a forward with ``hooks`` (unembedded there only when the model allows;
    :func:`patching.wiring.forward_logits`)."""
    return forward_logits(setup.model, setup.wiring.graph.meta, sub.clean, hooks, pos=sub.pos)


def _metric_total(setup: _Setup, logits: Tensor, sub: TaskBatch, clean_logits: Tensor) -> Tensor:
    fn, setup.metric_name = resolve_metric(setup.metric, clean_logits.float())
    return fn(logits.float(), sub).float().sum()


def atp(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
        metric: str | Metric = "logit_diff", level: str = "node", reference: TaskBatch | None = None,
        per_position: bool = False, prompt_batch: int | None = None, mean_include_bos: bool = False,
        qk_fix: bool = False) -> Scores:
    """Attribution patching: first-order estimate of every node's (or neuron's) ablation effect.

    ``qk_fix`` is accepted only to refuse it in one line: AtP*'s QK fix recomputes the attention pattern for a
    change of a head's query or key *input*, which edge attribution (``eap`` / ``eap_ig``) scores and node-level
    AtP does not (a node's output reaches later queries and keys through every downstream path at once)."""
    t0 = time.perf_counter()
    if qk_fix:
        raise ValueError("atp: qk_fix applies to edge attribution (eap, eap_ig), whose q/k edges it recomputes "
                         "exactly; node-level AtP has no q/k inputs to fix")
    if level not in ("node", "neuron"):
        raise ValueError(f"atp: level must be 'node' or 'neuron', got {level!r}")
    if isinstance(metric, str):
        check_gradient_metric("atp", metric)
    ids = unit_ids(graph, level)
    if not ids:
        raise ValueError("atp: the graph has no neurons; build it with neurons=True")
    setup = _Setup(model, graph, batch, ablation, metric, reference, per_position, edges=False,
                   prompt_batch=prompt_batch, mean_include_bos=mean_include_bos)
    setup.fit()
    node_values = torch.zeros(graph.n_nodes, dtype=torch.float32, device=setup.wiring.device)
    for sub in setup.parts():
        clean: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}
        with torch.enable_grad(), setup.prepared():
            logits = _logits_at_pos(setup, sub, _probe_hooks(setup, record=clean, sender_probes=probes,
                                                             receiver_probes=None))
            total = _metric_total(setup, logits, sub, logits.detach())
            keys = list(probes)
            grads = torch.autograd.grad(total, [probes[k] for k in keys], allow_unused=True)
        setup.forward_passes += 1
        del logits, total
        abl = setup.values(sub, clean)
        for k, g_ in zip(keys, grads, strict=True):
            if g_ is None:
                continue
            grp = next(s for s in setup.wiring.senders if s.key == k)
            diff = (abl[k] - clean[k]).float()                                  # [b|1, P|1, n, f]
            node_values[grp.node_idx] += (diff * g_.float()).sum(dim=(0, 1, 3)).to(node_values.device)
    node_values /= max(len(setup.batch), 1)
    idx = torch.tensor([graph.node_index[i] for i in ids], dtype=torch.long, device=node_values.device)
    return Scores(graph, level, node_values[idx].detach().cpu(), ids, "atp", ablation, setup.metric_name,
                  setup.forward_passes, time.perf_counter() - t0)


def _sender_diff(setup: _Setup, abl: dict[str, Tensor], clean: dict[str, Tensor], b: int, P: int) -> Tensor:
    """``[S, b*P*d]`` float32: ``ablated_s - clean_s`` in the residual stream of every edge sender, in sender order."""
    w = setup.wiring
    out = torch.zeros(w.S, b * P * w.d_model, dtype=torch.float32, device=w.device)
    for g in w.senders:
        if g.s0 is None:
            continue
        diff = (g.out(abl[g.key]) - g.out(clean[g.key])).expand(b, P, g.n, w.d_model)   # [b, P, n, d]
        out[g.s0:g.s1] = diff.permute(2, 0, 1, 3).reshape(g.n, -1).float().to(w.device)
    return out


def eap(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
        metric: str | Metric = "logit_diff", reference: TaskBatch | None = None, per_position: bool = False,
        prompt_batch: int | None = None, qk_fix: bool = False, mean_include_bos: bool = False) -> Scores:
    """Edge attribution patching (Syed et al. 2023): every edge's effect from one backward pass."""
    return eap_ig(model, graph, batch, ablation=ablation, metric=metric, steps=1, reference=reference,
                  per_position=per_position, prompt_batch=prompt_batch, qk_fix=qk_fix,
                  mean_include_bos=mean_include_bos, _method="eap")


def eap_ig(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
           metric: str | Metric = "logit_diff", steps: int = 5, reference: TaskBatch | None = None,
           per_position: bool = False, prompt_batch: int | None = None, qk_fix: bool = False,
           mean_include_bos: bool = False, _method: str = "eap_ig") -> Scores:
    """EAP with integrated gradients over the input embeddings (Hanna et al. 2024), ``steps`` points.

    ``prompt_batch``: prompts per forward/backward (``None``: all at once); ``qk_fix``: AtP*'s exact attention
    patterns for edges into queries and keys (``patching/qkfix.py``)."""
    t0 = time.perf_counter()
    graph.require_edges(_method)
    if steps < 1:
        raise ValueError(f"{_method}: steps must be >= 1, got {steps}")
    if isinstance(metric, str):
        check_gradient_metric(_method, metric, steps=steps)
    setup = _Setup(model, graph, batch, ablation, metric, reference, per_position, edges=True,
                   prompt_batch=prompt_batch, mean_include_bos=mean_include_bos)
    w = setup.wiring
    fix = QKFix(setup.wiring, model) if qk_fix else None
    skip = fix.receivers if fix is not None else set()
    setup.fit()
    values = torch.zeros(graph.n_edges, dtype=torch.float32, device=w.device)
    # the clean point (alpha = 1) first: it records the clean activations and logits (KL needs them), needs no
    # ablated value, and is where the QK fix reads the pattern's gradient; then the ablation, then the others
    order = [steps, *range(1, steps)]
    for sub in setup.parts():
        b, P = sub.clean.shape
        clean: dict[str, Tensor] = {}
        fix_store: dict[str, Tensor] = {}
        pattern_grads: dict[int, Tensor] = {}
        clean_logits: Tensor | None = None
        abl: dict[str, Tensor] | None = None
        sum_bytes = 4 * b * P * w.d_model * sum(r.R for r in w.receivers if r.key not in skip)
        scorer = _Scorer(values, skip, scale=1.0 / steps, accumulate=steps > 1 and sum_bytes <= SUM_BYTES)
        for i, k in enumerate(order):
            first = i == 0
            probes: dict[str, Tensor] = {}
            patterns: dict[int, Tensor] = {}
            hooks = _probe_hooks(setup, record=clean if first else None, sender_probes=None, receiver_probes=probes,
                                 alpha=None if first else k / steps, abl=abl, on_grad=scorer)
            if fix is not None and first:
                hooks += fix.pattern_probe_hooks(patterns) + fix.capture_hooks(fix_store)
            with torch.enable_grad(), setup.prepared():
                logits = _logits_at_pos(setup, sub, hooks)
                if first:
                    clean_logits = logits.detach()
                total = _metric_total(setup, logits, sub, clean_logits)
                del logits
                if first:  # the clean activations are in: the ablation and the differences, before the backward
                    abl = setup.values(sub, clean)
                    scorer.D = _sender_diff(setup, abl, clean, b, P)
                scorer.expect([r for r in w.receivers if r.key in probes])
                total.backward(inputs=list(probes.values()) + list(patterns.values()))
                scorer.flush()
            setup.forward_passes += 1
            pattern_grads.update({L: p.grad.float() for L, p in patterns.items()})
            del total, probes, patterns
        scorer.finish()
        if fix is not None:
            fix.verify(fix_store)
            fix.add_scores(values, fix_store, scorer.D, pattern_grads, b, P)
    values /= max(len(setup.batch), 1)
    method = _method + ("_qkfix" if qk_fix else "")
    return Scores(graph, "edge", values.detach().cpu(), unit_ids(graph, "edge"), method, ablation, setup.metric_name,
                  setup.forward_passes, time.perf_counter() - t0)


SUM_BYTES = 1 << 29  # EAP-IG keeps per-group gradient sums over its points when they fit in 512 MiB


class _Scorer:
    """``values[edge(r, s)] += scale * grad_r . D_s`` (float32) from the receiver gradients of the backward passes.

    Groups that read the same sender prefix (the q, k and v groups of a layer) are stacked into one matrix product.
    With ``accumulate`` (EAP-IG when the float32 gradient sums over its points fit :data:`SUM_BYTES`) each group's
    gradient is added to a sum and everything is scored once at the end (one product per prefix for all points);
    otherwise a prefix is scored as soon as its last group's gradient arrives and the gradients are freed, so at
    most one layer's gradients are held. Receiver groups in ``skip`` (the QK fix's) are left to it."""

    def __init__(self, values: Tensor, skip: set[str], scale: float, *, accumulate: bool = False):
        self.values, self.skip, self.scale, self.accumulate = values, skip, scale, accumulate
        self.D: Tensor | None = None
        self._want: dict[int, int] = {}
        self._have: dict[int, list[tuple[Any, Tensor]]] = {}
        self._sums: dict[str, tuple[Any, Tensor]] = {}

    def expect(self, groups: list[Any]) -> None:
        self._want, self._have = {}, {}
        for r in groups:
            if r.key not in self.skip:
                self._want[r.prefix] = self._want.get(r.prefix, 0) + 1

    def __call__(self, r: Any, grad: Tensor) -> None:
        if r.key in self.skip:
            return None
        g = grad.reshape(r.R, -1).float() * self.scale
        if self.accumulate:
            self._sums[r.key] = (r, g if r.key not in self._sums else self._sums[r.key][1].add_(g))
            return None
        have = self._have.setdefault(r.prefix, [])
        have.append((r, g))
        if len(have) == self._want[r.prefix]:
            self._score(self._have.pop(r.prefix))
        return None

    def _score(self, have: list[tuple[Any, Tensor]]) -> None:
        D, prefix = self.D, have[0][0].prefix
        G = torch.cat([g.to(D.device) for _, g in have])                                 # [sum R, b*P*d]
        out = G @ D[:prefix].T                                                           # [sum R, prefix]
        idx = torch.cat([q.edge_idx.to(self.values.device) for q, _ in have])
        self.values[idx.reshape(-1)] += out.reshape(-1).to(self.values.device)

    def flush(self) -> None:
        """After a backward pass: groups whose gradient never came (no path to the metric) have gradient 0."""
        for prefix in list(self._have):
            self._score(self._have.pop(prefix))

    def finish(self) -> None:
        """After the last point: score the accumulated sums, one product per prefix."""
        by_prefix: dict[int, list[tuple[Any, Tensor]]] = {}
        for r, g in self._sums.values():
            by_prefix.setdefault(r.prefix, []).append((r, g))
        self._sums = {}
        for have in by_prefix.values():
            self._score(have)


__all__ = ["atp", "eap", "eap_ig", "check_gradient_metric", "GRADIENT_METHODS"]
