"""Gradient attribution: AtP for nodes and neurons, EAP and EAP-IG for edges.

All three estimate the same quantity as exact patching, ``m(ablated) - m(clean)`` averaged over the
batch, and return the same :class:`patching.scores.Scores`:

* **AtP** (attribution patching; Nanda 2022, Kramar et al. 2024 "AtP*"): first-order Taylor
  expansion around the clean run, ``score(u) = sum_{b,p} (ablated_u - clean_u) . dm/d act_u / B``,
  one forward + one backward with a zero probe added at every sender activation (plain AtP; not the
  AtP* QK-fix or GradDrop).
* **EAP** (edge attribution patching; Syed, Rager & Conmy 2023): ``score(s -> r) =
  sum_{b,p} (ablated_s - clean_s) . dm/d input_r / B`` with the gradient taken at the receiver's input
  (per head and per q/k/v input), i.e. the derivative of exactly the quantity edge patching moves.
  Two forwards (ablation capture; clean with gradients) and one backward; all edges of a receiver
  group at once by one matrix product.
* **EAP-IG** (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness"): EAP with the
  gradient averaged over ``steps`` points on the straight line between the ablated and the clean
  input embeddings, ``x(a) = x_abl + a (x_clean - x_abl)`` for ``a = k/steps, k = 1..steps`` (a right
  Riemann sum: ``steps=1`` is EAP; the authors' code uses ``k = 0..steps-1``). The embeddings are
  the ``embed`` and ``pos_embed`` senders, whose ablated values follow the chosen ablation.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from patching.ablation import ablation_values, check_ablation
from patching.batch import TaskBatch
from patching.exact import resolve_metric
from patching.graph import ComponentGraph
from patching.metrics import Metric, gather_pos
from patching.scores import Scores, unit_ids
from patching.wiring import Hook, Wiring, prepared

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
    """Wiring, batch and (once computed) the clean and ablated sender activations of one batch."""

    def __init__(self, model: Any, graph: ComponentGraph, batch: TaskBatch, ablation: str, metric: str | Metric,
                 reference: TaskBatch | None, per_position: bool, split: bool):
        check_ablation(ablation)
        self.model, self.ablation, self.metric = model, ablation, metric
        self.reference, self.per_position = reference, per_position
        self.wiring = Wiring(model, graph)
        self.batch = batch.to(self.wiring.device)
        self.split = split and self.wiring.needs_split()
        self.ungroup = split and self.wiring.ungroup
        self.forward_passes = 0
        self.clean_units: dict[str, Tensor] = {}
        self.abl_units: dict[str, Tensor] = {}
        self.clean_logits: Tensor | None = None

    def capture_clean(self) -> None:
        with torch.no_grad(), prepared(self.model, split_qkv=self.split, ungroup=self.ungroup):
            logits, self.clean_units = self.wiring.capture(self.batch.clean)
        self.clean_logits = gather_pos(logits, self.batch.pos)
        self.forward_passes += 1

    def ablate(self) -> None:
        with torch.no_grad(), prepared(self.model, split_qkv=self.split, ungroup=self.ungroup):
            self.abl_units, runs = ablation_values(self.wiring, self.batch, self.clean_units, self.ablation,
                                                   reference=self.reference, per_position=self.per_position)
        self.forward_passes += runs


def _grad_pass(setup: _Setup, *, sender_probes: bool, receiver_probes: bool,
               alpha: float | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """One forward + backward on the clean prompts with zero probes; returns the probe gradients
    (``senders[key]`` in unit form, ``receivers[key]`` as ``[1, R, B*P, d]``) and the metric name.

    Without ``alpha`` the pass also records the clean sender activations and logits in ``setup``
    (when it has none yet). With ``alpha`` the embedding senders are replaced by
    ``abl + alpha (clean - abl)`` (EAP-IG).
    """
    w, b, model = setup.wiring, setup.batch, setup.model
    record = alpha is None and not setup.clean_units
    scratch: dict[str, Tensor] = {}
    probes_s: dict[str, Tensor] = {}
    probes_r: dict[str, Tensor] = {}
    hooks: list[Hook] = w.ln_hooks(scratch)

    def sender_fn(g):
        def fn(x: Tensor, hook: Any) -> Tensor | None:
            blk = scratch.get(g.in_hook) if g.in_hook else None
            u = g.units(x, blk)
            if record:
                setup.clean_units[g.key] = u.detach().clone()
            if alpha is not None and g.kind in ("embed", "pos_embed"):
                abl = setup.abl_units[g.key]
                u = abl + alpha * (u - abl)
            elif not sender_probes:
                return None
            if sender_probes:
                probe = torch.zeros_like(u, requires_grad=True)
                probes_s[g.key] = probe
                u = u + probe
            return g.from_units(u, blk)
        return fn

    def receiver_fn(r):
        def fn(x: Tensor, hook: Any) -> Tensor:
            probe = torch.zeros(1, r.R, x.shape[0] * x.shape[1], w.d_model, dtype=w.dtype, device=w.device,
                                requires_grad=True)
            probes_r[r.key] = probe
            return r.apply(x, probe, scratch.get(r.ln_hook) if r.ln_hook else None)
        return fn

    hooks += [(g.hook, sender_fn(g)) for g in w.senders]
    if receiver_probes:
        hooks += [(r.hook, receiver_fn(r)) for r in w.receivers]
    with torch.enable_grad(), prepared(model, split_qkv=setup.split, ungroup=setup.ungroup), model.hooks(fwd_hooks=hooks):
        logits = gather_pos(model(b.clean), b.pos)
        if setup.clean_logits is None:
            setup.clean_logits = logits.detach()
        metric_fn, name = resolve_metric(setup.metric, setup.clean_logits)
        total = metric_fn(logits, b).sum()
        keys = list(probes_s) + list(probes_r)
        tensors = [probes_s[k] for k in probes_s] + [probes_r[k] for k in probes_r]
        grads = torch.autograd.grad(total, tensors, allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(t)) for k, g, t in zip(keys, grads, tensors, strict=True)}
    setup.forward_passes += 1
    return {k: out[k] for k in probes_s}, {k: out[k] for k in probes_r}, name


def atp(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
        metric: str | Metric = "logit_diff", level: str = "node", reference: TaskBatch | None = None,
        per_position: bool = False) -> Scores:
    """Attribution patching: first-order estimate of every node's (or neuron's) ablation effect."""
    t0 = time.perf_counter()
    if level not in ("node", "neuron"):
        raise ValueError(f"atp: level must be 'node' or 'neuron', got {level!r}")
    if isinstance(metric, str):
        check_gradient_metric("atp", metric)
    ids = unit_ids(graph, level)
    if not ids:
        raise ValueError("atp: the graph has no neurons; build it with neurons=True")
    setup = _Setup(model, graph, batch, ablation, metric, reference, per_position, split=False)
    grads, _, name = _grad_pass(setup, sender_probes=True, receiver_probes=False)
    setup.ablate()
    B = len(setup.batch)
    node_values = torch.zeros(graph.n_nodes, dtype=torch.float32, device=setup.wiring.device)
    for g in setup.wiring.senders:
        diff = setup.abl_units[g.key] - setup.clean_units[g.key]          # [B|1, P|1, n, f]
        per_unit = (diff * grads[g.key]).sum(dim=(0, 1, 3)) / B            # [n]
        node_values[g.node_idx] = per_unit.float()
    idx = torch.tensor([graph.node_index[i] for i in ids], dtype=torch.long, device=node_values.device)
    return Scores(graph, level, node_values[idx].detach().cpu(), ids, "atp", ablation, name,
                  setup.forward_passes, time.perf_counter() - t0)


def _sender_diff(setup: _Setup, clean_units: dict[str, Tensor]) -> Float[Tensor, "S B P d"]:
    """``ablated_s - clean_s`` in the residual stream for every edge sender, stacked in sender order."""
    w, b = setup.wiring, setup.batch
    B, P = b.clean.shape
    out = torch.zeros(w.S, B, P, w.d_model, dtype=w.dtype, device=w.device)
    for g in w.senders:
        if g.s0 is None:
            continue
        diff = g.out(setup.abl_units[g.key]) - g.out(clean_units[g.key])  # [B|1, P|1, n, d]
        out[g.s0:g.s1] = diff.permute(2, 0, 1, 3)
    return out


def _edge_scores(setup: _Setup, diff: Tensor, grads: dict[str, Tensor], n_edges: int) -> Tensor:
    """``values[edge(r, s)] = sum_{b,p} grad_r . diff_s / B`` for every receiver group at once."""
    w = setup.wiring
    B = diff.shape[1]
    values = torch.zeros(n_edges, dtype=w.dtype, device=w.device)
    for r in w.receivers:
        G = grads[r.key].reshape(r.R, -1)                                  # [R, B*P*d]
        Dm = diff[: r.prefix].reshape(r.prefix, -1)                        # [S_r, B*P*d]
        values[r.edge_idx.reshape(-1)] = (G @ Dm.T).reshape(-1) / B
    return values


def eap(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
        metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
        per_position: bool = False) -> Scores:
    """Edge attribution patching (Syed et al. 2023): every edge's effect from one backward pass."""
    return eap_ig(model, graph, batch, ablation=ablation, metric=metric, steps=1, reference=reference,
                  per_position=per_position, _method="eap")


def eap_ig(model: Any, graph: ComponentGraph, batch: TaskBatch, *, ablation: str = "resample",
           metric: str | Metric = "logit_diff", steps: int = 5, reference: TaskBatch | None = None,
           per_position: bool = False, _method: str = "eap_ig") -> Scores:
    """EAP with integrated gradients over the input embeddings (Hanna et al. 2024), ``steps`` points."""
    t0 = time.perf_counter()
    graph.require_edges(_method)
    if steps < 1:
        raise ValueError(f"{_method}: steps must be >= 1, got {steps}")
    if isinstance(metric, str):
        check_gradient_metric(_method, metric, steps=steps)
    setup = _Setup(model, graph, batch, ablation, metric, reference, per_position, split=True)
    if steps > 1:  # the interpolation needs the ablated embeddings before the gradient passes
        setup.capture_clean()
        setup.ablate()
    total: dict[str, Tensor] = {}
    name = ""
    for k in range(1, steps + 1):
        alpha = None if steps == 1 else k / steps
        _, grads, name = _grad_pass(setup, sender_probes=False, receiver_probes=True, alpha=alpha)
        for key, g in grads.items():
            total[key] = total[key] + g if key in total else g
    if steps == 1:
        setup.ablate()
    mean = {key: g / steps for key, g in total.items()}
    diff = _sender_diff(setup, setup.clean_units)
    values = _edge_scores(setup, diff, mean, graph.n_edges)
    return Scores(graph, "edge", values.detach().float().cpu(), unit_ids(graph, "edge"), _method, ablation, name,
                  setup.forward_passes, time.perf_counter() - t0)


__all__ = ["atp", "eap", "eap_ig", "check_gradient_metric", "GRADIENT_METHODS"]
