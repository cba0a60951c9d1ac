"""Feature-to-feature and feature-to-logits edges: exact edge patching, EAP and EAP-IG (Marks et al. 2024,
*Sparse Feature Circuits*, app. on edge attribution; Syed et al. 2023; Hanna et al. 2024).

An edge ``u -> d`` joins a unit ``u`` (feature or error) of site ``s`` to a candidate feature ``d`` of a later
site ``s'`` that ``s`` reaches directly (no third spliced site on the path; :mod:`patching.features`), or ``u``
to ``logits``. Its score is the change of the metric, averaged over prompts, in this experiment (**exact edge
patching**, ``method="patch"``):

1. in an otherwise clean forward, ``u`` alone is ablated at ``s`` (``x_s += (a'_u - u) W_u``, or ``err' - err``;
   every other unit of ``s`` clean) and every spliced site strictly between ``s`` and ``s'`` is held at its
   clean activation, so the change reaches ``s'`` only along direct paths; ``d`` is recomputed at ``s'``:
   ``d_new = encode(x_s')[d]`` (the encoder's full nonlinearity);
2. in a second, clean forward only ``d``'s value changes: ``x_s' += (d_new - d) W_d`` (every other unit of
   ``s'`` and its error keep their clean values; later sites are computed normally), and the metric is read.

For ``logits`` step 1 holds every site after ``s`` clean and reads the metric directly. Positions: ``u`` is
ablated at every position and ``d`` recomputed and changed at every position.

**EAP** estimates it to first order: ``score(u -> d) = sum_{b,p,p'} dm/dd_{b,p'} . (dd_{b,p'}/du_{b,p}) .
(a'_u - u)_{b,p} / B``, with ``dm/dd = W_d . dm/dx_s'`` from one backward pass and the Jacobian-vector products
from one backward pass per chunk of receivers ``d``: the forward is run on ``chunk * b`` rows in which every
site outputs a fresh leaf (so gradients flow along direct paths only), and ``sum dm/dd * d`` is back-propagated
to the leaves of the upstream sites; ``dd/du = (d/dx_s) . W_u`` (the feature's decoder row) or the error's
``d``-vector. ``u -> logits``: the metric's gradient at the leaves. Memory: ``prompt_batch`` prompts at a time,
``chunk`` receivers per backward (``max_bytes``).

**EAP-IG** (Marks et al.'s edge IG) integrates the gradient factor: ``dm/dd`` is averaged over
``alpha = k/steps, k = 1..steps`` of ``d``'s site's own ablation path (:func:`patching.features_run.
probe_gradients`, as node IG; for ``u -> logits`` the factor is 1), the Jacobian-vector product is taken at the
clean run. ``integrate_jacobian=True`` also averages it over points where every upstream site's units are
moved ``1 - alpha`` of the way to their ablated values (one backward over ``steps * chunk * b`` rows, ``steps``
times the cost). ``steps=1`` is EAP. On a model that is linear in the site activations (attention patterns,
norms and MLP gates frozen, SAE encoders without activation) every variant equals exact edge patching
(tests/test_feature_edges.py).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from patching.batch import TaskBatch
from patching.features_run import FeatureEngine, Part, probe_gradients, row_bytes, site_hooks
from patching.metrics import Metric
from patching.scores import Scores
from patching.wiring import prepared

EDGE_METHODS = ("eap", "eap-ig", "patch")
_ALIASES = {"eap_ig": "eap-ig", "edge-patch": "patch"}


class _Stop(Exception):
    pass


def _run(eng: FeatureEngine, tokens: Tensor, fn: Any, pos: Tensor | None = None) -> Tensor | None:
    """A forward with ``fn`` at every site, stopped when ``fn`` raises :class:`_Stop`; logits at ``pos`` if it
    runs through."""
    from patching.wiring import forward_logits

    eng.forward_passes += 1
    try:
        with prepared(eng.model):
            return forward_logits(eng.model, eng.fgraph.meta, tokens, site_hooks(eng.hooks, eng.bases, fn), pos=pos)
    except _Stop:
        return None


def _direct(fg: Any) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for s, r in fg.direct:
        out.setdefault(r, []).append(s)
    return out


def _deltas(part: Part, s: int) -> tuple[Tensor, Tensor]:
    """Clean-run ablation deltas of site ``s``: features ``[b, P, n]``, error ``[b, P, d]`` (float32)."""
    return (part.ua[s] - part.u[s]).float().expand_as(part.u[s]), (part.ea[s] - part.e[s]).float().expand_as(part.e[s])


def _sender_scores(eng: FeatureEngine, part: Part, s: int, grad: Tensor) -> Tensor:
    """``[K, n_s + 1]``: sum over prompts and positions of the site-``s`` gradient ``grad [K, b, P, d]`` times each
    unit's write (decoder row x delta for features, the error delta)."""
    du, de = _deltas(part, s)
    W = eng.fams[s].features.directions.float()
    feat = torch.einsum("kbpd,nd,bpn->kn", grad, W, du)
    err = torch.einsum("kbpd,bpd->k", grad, de)
    return torch.cat([feat, err[:, None]], dim=1)


def _eap_part(eng: FeatureEngine, part: Part, dense: Tensor, *, steps: int | None, chunk: int,
              integrate_jacobian: bool = False) -> None:
    fg = eng.fgraph
    b, P = part.b, part.P
    n_sites = len(fg.sites)
    direct = _direct(fg)
    if steps is None:
        g_site = probe_gradients(eng, part)
    else:
        ig = [k / steps for k in range(1, steps + 1)]
        g_site = [probe_gradients(eng, part, ig, site=s)[s] if s in direct else None
                  for s in range(n_sites)]
    alphas = [k / steps for k in range(1, steps + 1)] if steps is not None and integrate_jacobian else [1.0]
    A = len(alphas)
    c_alpha = torch.tensor([1.0 - a for a in alphas], device=eng.device)

    def leaf_pass(K: int, receiver: int | None, pick: Any) -> list[Tensor | None]:
        """Rows ``A * K * b``: every site before ``receiver`` outputs a leaf (moved along its path at alpha);
        ``pick(x_r)`` gives the scalar to back-propagate (``receiver`` None: the metric at the logits)."""
        leaves: list[Tensor | None] = [None] * n_sites
        box: dict[str, Tensor] = {}
        coef_rows = c_alpha.repeat_interleave(K).view(A * K, 1, 1)

        def fn(s: int, x: Tensor) -> Tensor:
            if receiver is not None and s == receiver:
                box["y"] = pick(x)
                raise _Stop
            if A > 1 or alphas[0] != 1.0:
                x = eng.shift(part, s, x, coef_rows.expand(A * K, 1, eng.fams[s].features.n), coef_rows)
            leaf = x.detach().requires_grad_(True)
            leaves[s] = leaf
            return leaf
        tokens = part.batch.clean.repeat(A * K, 1)
        with torch.enable_grad():
            logits = _run(eng, tokens, fn, pos=part.batch.pos.repeat(A * K))
            if receiver is None:
                y = part.metric_fn(logits.float().view(A * K, b, -1), part.batch).float().sum()
            else:
                y = box["y"]
            want = [leaf for leaf in leaves if leaf is not None]
            grads = torch.autograd.grad(y, want, allow_unused=True, materialize_grads=True)
        out: list[Tensor | None] = [None] * n_sites
        it = iter(grads)
        for s in range(n_sites):
            if leaves[s] is not None:
                out[s] = next(it).float().view(A, K, b, P, -1).sum(0) / A
        return out

    # edges into the logits
    ups = direct.get(n_sites, [])
    if ups:
        grads = leaf_pass(1, None, None)
        for s in ups:
            info = fg.sites[s]
            dense[fg.logits_index, info.first:info.error + 1] += _sender_scores(eng, part, s, grads[s])[0]
    # edges into the candidates of each site
    for r in range(n_sites):
        ups = direct.get(r, [])
        info_r = fg.sites[r]
        n_r = eng.fams[r].features.n
        if not ups or n_r == 0:
            continue
        g_feat = g_site[r] @ eng.fams[r].features.directions.float().T      # [b, P, n_r]: dm/dd
        for k0 in range(0, n_r, chunk):
            K = min(chunk, n_r - k0)
            sel = torch.arange(k0, k0 + K, device=eng.device)
            gk = g_feat[..., k0:k0 + K].permute(2, 0, 1)                     # [K, b, P]

            def pick(x: Tensor, _sel=sel, _gk=gk, _K=K, _r=r) -> Tensor:
                u = eng.fams[_r].read(x)[0].float().view(A, _K, b, P, -1)     # [A, K, b, P, n_r]
                d = u[:, torch.arange(_K), :, :, _sel]                        # [K, A, b, P]  (advanced indexing)
                return (d * _gk.unsqueeze(1)).sum()   # leaf_pass averages the gradients over alpha
            grads = leaf_pass(K, r, pick)
            for s in ups:
                info = fg.sites[s]
                dense[info_r.first + k0:info_r.first + k0 + K, info.first:info.error + 1] += \
                    _sender_scores(eng, part, s, grads[s])


def _patch_part(eng: FeatureEngine, part: Part, dense: Tensor, *, chunk: int) -> None:
    fg = eng.fgraph
    b, P = part.b, part.P
    n_sites = len(fg.sites)
    clean = part.clean_metric
    for s, r in fg.direct:
        fam = eng.fams[s]
        U = fam.features.n + 1
        info = fg.sites[s]
        for u0 in range(0, U, chunk):
            K = min(chunk, U - u0)
            onehot = torch.zeros(K, 1, U, device=eng.device)
            onehot[torch.arange(K), 0, u0 + torch.arange(K)] = 1.0
            fco, eco = onehot[..., :-1], onehot[..., -1:]
            box: dict[str, Tensor] = {}

            def fn_a(t: int, x: Tensor, _f=fco, _e=eco, _s=s, _r=r, _K=K, _box=box) -> Tensor | None:
                if t == _s:
                    return eng.shift(part, t, x, _f, _e)
                if _s < t < _r:
                    return part.x[t].repeat(_K, 1, 1)
                if t == _r:
                    _box["d"] = eng.fams[t].read(x)[0].view(_K, b, P, -1)
                    raise _Stop
                return None
            with torch.no_grad():
                logits = _run(eng, part.batch.clean.repeat(K, 1), fn_a, pos=part.batch.pos.repeat(K))
            if r == n_sites:
                m = part.metric_fn(logits.float().view(K, b, -1), part.batch).float()
                dense[fg.logits_index, info.first + u0:info.first + u0 + K] += (m - clean).sum(-1)
                continue
            change = box["d"] - part.u[r].unsqueeze(0)                         # [K, b, P, n_r]
            n_r = change.shape[-1]
            W_r = eng.fams[r].features.directions
            info_r = fg.sites[r]
            for k in range(K):
                for d0 in range(0, n_r, chunk):
                    Q = min(chunk, n_r - d0)
                    coef = torch.zeros(Q, b, P, n_r, device=eng.device, dtype=change.dtype)
                    coef[torch.arange(Q), :, :, d0 + torch.arange(Q)] = change[k, :, :, d0:d0 + Q].permute(2, 0, 1)
                    delta = (coef @ W_r.to(coef.dtype)).view(Q * b, P, -1)

                    def fn_b(t: int, x: Tensor, _delta=delta, _r=r) -> Tensor | None:
                        return x + _delta if t == _r else None
                    with torch.no_grad():
                        lg = _run(eng, part.batch.clean.repeat(Q, 1), fn_b, pos=part.batch.pos.repeat(Q))
                    m = part.metric_fn(lg.float().view(Q, b, -1), part.batch).float()
                    dense[info_r.first + d0:info_r.first + d0 + Q, info.first + u0 + k] += (m - clean).sum(-1)


def feature_edge_scores(model: Any, fgraph: Any, batch: TaskBatch, *, method: str = "eap-ig",
                        ablation: str = "mean", metric: str | Metric = "logit_diff", steps: int = 5,
                        reference: TaskBatch | None = None, prompt_batch: int | None = None,
                        chunk: int | None = None, max_bytes: int = 512 << 20,
                        integrate_jacobian: bool = False) -> Scores:
    """Scores of every edge of ``fgraph`` (module docstring), level ``"feature-edge"``, aligned with
    ``fgraph.edges``. ``chunk``: receivers per backward (EAP) or units per forward (patch); default from
    ``max_bytes``. ``integrate_jacobian`` (EAP-IG): integrate the Jacobian-vector products too (``steps``
    times the backward work)."""
    from patching.attribution import check_gradient_metric

    m = _ALIASES.get(method, method)
    if m not in EDGE_METHODS:
        raise ValueError(f"feature_edge_scores: unknown method {method!r}; choose one of {EDGE_METHODS}")
    if m != "patch" and isinstance(metric, str):
        check_gradient_metric("eap" if m == "eap" else "eap_ig", metric, steps=steps if m == "eap-ig" else None)
    if steps < 1:
        raise ValueError(f"feature_edge_scores: steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    eng = FeatureEngine(model, fgraph, batch, ablation=ablation, metric=metric, reference=reference,
                        prompt_batch=prompt_batch)
    N = fgraph.n_nodes
    dense = torch.zeros(N, N, dtype=torch.float32, device=eng.device)   # [receiver, sender]
    for part in eng.parts:
        if chunk is None:  # receivers (EAP) or senders (patch) per forward, from the memory budget
            per = part.b * row_bytes(fgraph, part.P, grad=m != "patch")
            per *= steps if m == "eap-ig" and integrate_jacobian else 1
            c = max(1, max_bytes // max(1, per))
        else:
            c = chunk
        if m == "patch":
            _patch_part(eng, part, dense, chunk=c)
        else:
            _eap_part(eng, part, dense, steps=steps if m == "eap-ig" else None, chunk=c,
                      integrate_jacobian=integrate_jacobian)
    dense /= max(1, len(batch))
    recv = torch.tensor([fgraph.node_index[e.receiver] for e in fgraph.edges], dtype=torch.long)
    send = torch.tensor([fgraph.node_index[e.sender] for e in fgraph.edges], dtype=torch.long)
    vals = dense.cpu()[recv, send] if len(fgraph.edges) else torch.zeros(0)
    return Scores(graph=fgraph, level="feature-edge", values=vals.float(), ids=tuple(fgraph.edge_ids), method=m,
                  ablation=ablation, metric=eng.metric_name, forward_passes=eng.forward_passes,
                  seconds=time.perf_counter() - t0)


__all__ = ["feature_edge_scores", "EDGE_METHODS"]
