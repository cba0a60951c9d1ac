"""Running a model with spliced sites: captures, ablation values, node patching and node attribution of a
:class:`patching.features.FeatureGraph` (Marks et al. 2024, *Sparse Feature Circuits*).

At a site ``x = u @ W + b + err`` (:mod:`patching.features`). **Ablating** a set of its nodes in a forward pass
changes the site's activation, as the forward computes it, by

    ``sum_{ablated features i} (a'_i - u_i) W_i  +  [error ablated] (err' - err)``

where ``u`` and ``err`` are the *current* values (recomputed from the site's current input, so upstream
ablations propagate) and ``a'``, ``err'`` the ablation values: ``zero`` (0), ``mean`` (the mean over the real
non-BOS tokens of the reference prompts, or of the clean prompts, exactly as the engine's mean ablation:
:mod:`patching.ablation`) or ``resample`` (the corrupted prompt's activations at the same position). Features
that are not candidates, and units not ablated, keep their current values. The feature change is the low-rank
product ``coef @ W[cand]`` (:class:`patching.senders.FeatureFamily`), never a dense tensor per unit.

Rows of a batched forward are mask-major: row ``k * b + j`` is mask ``k`` on prompt ``j``.

Scores (``feature_node_scores``, level ``"feature"``): ``m(ablated) - m(clean)`` averaged over prompts, per
node (``logits`` scores 0):

* ``patch``: exact, each node ablated alone (one batched forward per chunk of nodes);
* ``atp``: ``sum_{b,p} (a' - u) . dm/du / B`` from one forward + backward (``dm/du_i = W_i . dm/dx``; for
  the error node ``(err' - err) . dm/dx``); exact when the model is linear in the site activations;
* ``ig``: integrated gradients per site (Marks et al. 2024): the gradient at a site averaged over
  ``alpha = k/steps, k = 1..steps`` on the path where that site's candidates and error are moved ``1 - alpha``
  of the way to their ablated values, every other site computed normally (``steps=1`` is ``atp``; a right
  Riemann sum as the engine's EAP-IG). Exact, like ``atp``, when the model is linear in the site activations.

``per_position=True`` scores every (node, position) pair instead of summing over positions: ids
``{node}[{p}]``, positions counted from the start of the (right-padded) prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from patching.ablation import bos_token_id, check_ablation, mean_weights, trimmed
from patching.basis import Basis, check_basis
from patching.batch import TaskBatch
from patching.metrics import Metric
from patching.parts import check_prompt_batch, prompt_slices
from patching.patcher import resolve_metric
from patching.replay import Replay
from patching.scores import Scores
from patching.senders import SpliceSite
from patching.wiring import forward_logits, prepared

NODE_METHODS = ("atp", "patch", "ig")
_ALIASES = {"node-atp": "atp", "node-patch": "patch", "node-ig": "ig"}
SiteFn = Callable[[int, Tensor], Tensor | None]


# ------------------------------------------------------------------------------------------------ helpers
def check_sites(model: Any, sites: Mapping[str, Basis]) -> None:
    """One-line errors for an empty site map, a hook the model lacks, a non-basis or a read-only basis."""
    from patching.features import hook_short

    if not sites:
        raise ValueError("feature graph: no sites given (hook -> basis)")
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(f"feature graph: expected a TransformerBridge, got {type(model).__name__}")
    for h, b in sites.items():
        hook_short(h)
        if h not in hook_dict:
            raise ValueError(f"feature graph: the model has no hook {h!r}")
        check_basis(b, h)
        if getattr(b, "decodable", True) is False:
            raise ValueError(f"feature graph: the basis at {h!r} cannot decode, so it cannot be spliced")


def model_meta(model: Any) -> dict[str, Any]:
    """Sizes and where the logits are read: ``logits_hook`` and ``logits_at_pos`` as
    :func:`patching.model_info.inspect_model` decides them (one tiny forward; none of its other checks)."""
    from patching.model_info import _logits_check

    cfg = model.cfg
    hook = "ln_final.hook_in" if "ln_final.hook_in" in model.hook_dict else "unembed.hook_in"
    meta = {"model": str(getattr(cfg, "model_name", None) or type(model).__name__), "logits_hook": hook,
            "logits_at_pos": _logits_check(model, hook), "n_layers": len(model.blocks)}
    for key in ("d_model", "d_vocab", "n_heads", "d_mlp"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            meta[key] = v
    return meta


def row_bytes(fgraph: Any, P: int, *, grad: bool) -> int:
    """Estimated bytes one prompt row of ``P`` positions needs in a forward (one layer's working set, the sites'
    encodings, the logits at ``pos``), plus every layer's saved activations when ``grad``."""
    meta = fgraph.meta
    d = int(meta.get("d_model") or max(s.d for s in fgraph.sites))
    dm, H, L = int(meta.get("d_mlp") or 4 * d), int(meta.get("n_heads") or 1), int(meta.get("n_layers") or 1)
    widest = max([s.n_units for s in fgraph.sites] + [s.d for s in fgraph.sites])
    out = P * 4 * (8 * d + 2 * dm + 2 * H * P + 4 * widest) + 4 * int(meta.get("d_vocab") or 0)
    if grad:
        out += P * 4 * (L * (10 * d + 3 * dm + 2 * H * P) + 2 * widest * len(fgraph.sites))
    return out


def _flat(x: Tensor, d: int, hook: str) -> Tensor:
    if x.shape[-1] == d:
        return x
    if x.dim() >= 2 and x.shape[-1] * x.shape[-2] == d:
        return x.reshape(*x.shape[:-2], d)
    raise ValueError(f"site {hook!r}: activations of shape {tuple(x.shape)}, the basis expects a last dimension {d}")


def site_hooks(hooks: list[str], bases: Mapping[str, Basis], fn: SiteFn) -> list[tuple[str, Any]]:
    """TransformerLens hooks calling ``fn(site index, x [..., d]) -> new x | None`` at each site (``hook_z``
    flattened to ``[..., H * d_head]`` and back; ``x`` in the basis' dtype, the result in the model's)."""
    def make(s: int, h: str) -> Any:
        d = int(bases[h].d_in)
        dtype = bases[h].directions.dtype  # a bfloat16 model's activations are read in the basis' dtype

        def hook_fn(x: Tensor, hook: Any) -> Tensor | None:
            out = fn(s, _flat(x, d, h).to(dtype))
            return None if out is None else out.to(x.dtype).reshape(x.shape)
        return hook_fn
    return [(h, make(s, h)) for s, h in enumerate(hooks)]


def capture_sites(model: Any, sites: Mapping[str, Basis], tokens: Tensor) -> tuple[dict[str, Tensor], list[str]]:
    """The activation at every site hook (flattened, detached) and the order the hooks fired in; a one-line
    error when a site hook does not fire exactly once."""
    store: dict[str, Tensor] = {}
    order: list[str] = []
    counts: dict[str, int] = {}

    def make(h: str) -> Any:
        def fn(x: Tensor, hook: Any) -> None:
            counts[h] = counts.get(h, 0) + 1
            if h not in store:
                order.append(h)
            store[h] = _flat(x, int(sites[h].d_in), h).detach().to(sites[h].directions.dtype)
        return fn
    with torch.no_grad(), prepared(model), model.hooks(fwd_hooks=[(h, make(h)) for h in sites]):
        model(tokens)
    for h in sites:
        if counts.get(h, 0) != 1:
            raise ValueError(f"feature graph: site hook {h!r} fired {counts.get(h, 0)} times in one forward "
                             "(a site must be computed exactly once)")
    return store, order


def direct_pairs(model: Any, sites: Mapping[str, Basis], order: list[str], tokens: Tensor) -> list[tuple[int, int]]:
    """``(s, r)`` site pairs (``r == len(order)`` = logits) with a path from site ``s``'s output to site ``r``'s
    input through no other site: every site outputs a fresh leaf, and ``s`` is direct to ``r`` when ``r``'s input
    depends on ``s``'s leaf in the autograd graph."""
    leaves: list[Tensor] = []
    inputs: list[Tensor] = []

    def fn(s: int, x: Tensor) -> Tensor:
        inputs.append(x)
        leaf = x.detach().clone().requires_grad_(True)
        leaves.append(leaf)
        return leaf
    with torch.enable_grad(), prepared(model), model.hooks(fwd_hooks=site_hooks(order, sites, fn)):
        logits = model(tokens)
    pairs: list[tuple[int, int]] = []
    outs = [*inputs, logits]
    for r in range(1, len(outs)):
        if not outs[r].requires_grad:
            continue
        grads = torch.autograd.grad(outs[r].float().sum(), leaves[:r], allow_unused=True, retain_graph=True)
        pairs += [(s, r) for s, g in enumerate(grads) if g is not None]
    return pairs


@dataclass(eq=False)
class Part:
    """One prompt batch: its prompts, clean logits / metric, and per site the clean input ``x``, candidate
    activations ``u``, error ``e`` and their ablated values ``ua`` / ``ea`` (``[b | 1, P | 1, .]``)."""

    rows: slice
    batch: TaskBatch
    clean_logits: Tensor
    metric_fn: Metric
    clean_metric: Tensor
    x: list[Tensor] = field(default_factory=list)
    u: list[Tensor] = field(default_factory=list)
    e: list[Tensor] = field(default_factory=list)
    ua: list[Tensor] = field(default_factory=list)
    ea: list[Tensor] = field(default_factory=list)
    replay: Any = None  # patching.replay.Replay of the clean forward (suffix runs), or None

    @property
    def b(self) -> int:
        return int(self.batch.clean.shape[0])

    @property
    def P(self) -> int:
        return int(self.batch.clean.shape[1])


class FeatureEngine:
    """Captures and ablation values of one (model, feature graph, batch), shared by the patcher and the scores.

    ``prompt_batch`` prompts per forward (memory); a mean ablation is over every prompt (or ``reference``).
    """

    def __init__(self, model: Any, fgraph: Any, batch: TaskBatch, *, ablation: str, metric: str | Metric,
                 reference: TaskBatch | None = None, prompt_batch: int | None = None, suffix: bool = False):
        check_ablation(ablation, "feature engine")
        check_prompt_batch(prompt_batch, "feature engine")
        self.model, self.fgraph, self.ablation = model, fgraph, ablation
        self.hooks = [s.hook for s in fgraph.sites]
        self.bases = fgraph.bases
        self.device = batch.clean.device
        self.fams: tuple[SpliceSite, ...] = fgraph.families(self.device)  # raises for a site without a basis
        check_sites(model, {h: self.bases[h] for h in self.hooks})
        self.batch = batch
        self.forward_passes = 0
        self.suffix_runs = 0
        self.metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)
        self.parts: list[Part] = []
        with torch.no_grad():
            for rows in prompt_slices(len(batch), prompt_batch):
                sub = trimmed(batch[rows])
                store: dict[int, Tensor] = {}
                rp = Replay(model, len(sub)) if suffix else None
                with rp.recording() if rp is not None else nullcontext():
                    logits = self.forward(sub.clean, sub.pos, self._recorder(store))
                if rp is not None and not self.parts:
                    rp.verify(logits, sub.pos)
                elif rp is not None:  # the same calls on other prompts: the first batch's verdict holds
                    rp.adopt(self.parts[0].replay)
                fn, _ = resolve_metric(metric, logits)
                part = Part(rows, sub, logits, fn, fn(logits.float(), sub).float(), replay=rp)
                for s, fam in enumerate(self.fams):
                    u, e = fam.read(store[s])
                    part.x.append(store[s])
                    part.u.append(u)
                    part.e.append(e)
                self.parts.append(part)
            self._ablate(reference, prompt_batch)

    # ----------------------------------------------------------------------------------------- forwards
    def _recorder(self, store: dict[int, Tensor]) -> SiteFn:
        def fn(s: int, x: Tensor) -> None:
            store[s] = x.detach()
        return fn

    def forward(self, tokens: Tensor, pos: Tensor, fn: SiteFn, *, extra: list | None = None) -> Tensor:
        """Next-token logits at ``pos`` ``[N, V]`` of a forward with ``fn`` at every site."""
        with prepared(self.model):
            out = forward_logits(self.model, self.fgraph.meta, tokens,
                                 site_hooks(self.hooks, self.bases, fn) + list(extra or []), pos=pos)
        self.forward_passes += 1
        return out

    def suffix_forward(self, part: Part, K: int, start: int, fn: SiteFn) -> Tensor | None:
        """The logits at ``pos`` ``[K * b, V]`` of blocks ``start..`` re-run from the clean residual stream on
        ``K`` copies of the part (:class:`patching.replay.Replay`; sites of earlier blocks must be unchanged),
        or ``None`` when the recorded forward cannot be replayed from there."""
        rp = part.replay
        if rp is None or not rp.usable_from(start):
            return None
        with prepared(self.model), self.model.hooks(fwd_hooks=site_hooks(self.hooks, self.bases, fn)):
            x = rp.blocks(rp.pre(start).repeat(K, 1, 1), start, K)
            out = rp.logits(rp.gather(x, part.batch.pos))[:, 0]
        self.forward_passes += 1
        self.suffix_runs += 1
        return out

    def _ablate(self, reference: TaskBatch | None, prompt_batch: int | None) -> None:
        if self.ablation == "resample":
            for part in self.parts:
                store: dict[int, Tensor] = {}
                self.forward(part.batch.corrupt, part.batch.pos, self._recorder(store))
                for s, fam in enumerate(self.fams):
                    ua, ea = fam.read(store[s])
                    part.ua.append(ua)
                    part.ea.append(ea)
            return
        if self.ablation == "zero":
            for part in self.parts:
                part.ua = [torch.zeros_like(u[:1, :1]) for u in part.u]
                part.ea = [torch.zeros_like(e[:1, :1]) for e in part.e]
            return
        bos = bos_token_id(self.model)
        n = len(self.fams)
        su: list[Tensor | float] = [0.0] * n
        se: list[Tensor | float] = [0.0] * n
        count = torch.zeros((), dtype=torch.float64)

        def add(sub: TaskBatch, us: list[Tensor], es: list[Tensor]) -> None:
            nonlocal count
            w = mean_weights(sub, bos=bos).float().unsqueeze(-1)
            count = count + float(w.sum())
            for s in range(n):
                wk = w.to(us[s].device)
                su[s] = su[s] + (us[s].float() * wk).sum((0, 1))
                se[s] = se[s] + (es[s].float() * wk).sum((0, 1))
        if reference is None:
            for part in self.parts:
                add(part.batch, part.u, part.e)
        else:
            ref = reference.to(self.device)
            for rows in prompt_slices(len(ref), prompt_batch):
                sub = trimmed(ref[rows])
                store: dict[int, Tensor] = {}
                self.forward(sub.clean, sub.pos, self._recorder(store))
                reads = [fam.read(store[s]) for s, fam in enumerate(self.fams)]
                add(sub, [r[0] for r in reads], [r[1] for r in reads])
        if float(count) == 0:
            raise ValueError("mean ablation: no real tokens to average over (every position is padding or BOS)")
        c = float(count)
        for part in self.parts:
            part.ua = [(su[s] / c).to(part.u[s].dtype).view(1, 1, -1) for s in range(n)]
            part.ea = [(se[s] / c).to(part.e[s].dtype).view(1, 1, -1) for s in range(n)]

    # ---------------------------------------------------------------------------------------- node masks
    def split_mask(self, m: Tensor) -> list[tuple[Tensor, Tensor]]:
        """A node mask ``[K, N]`` or ``[K, N, P]`` -> per site (features ``[K, 1|P, n]``, error ``[K, 1|P, 1]``)
        as float coefficients."""
        m = m.to(self.device).float()
        if m.dim() == 2:
            m = m.unsqueeze(-1)
        out = []
        for info in self.fgraph.sites:
            f = m[:, info.first:info.error].transpose(1, 2)       # [K, P|1, n]
            e = m[:, info.error:info.error + 1].transpose(1, 2)   # [K, P|1, 1]
            out.append((f, e))
        return out

    def shift(self, part: Part, s: int, x: Tensor, fcoef: Tensor, ecoef: Tensor) -> Tensor:
        """``x`` ``[K*b, P, d]`` moved by ``fcoef * (a' - u) W + ecoef * (err' - err)`` at site ``s`` (current
        ``u``, ``err``; coefficients ``[K, P|1, .]``, positions cut to ``x``'s)."""
        b, P = part.b, x.shape[1]
        K = x.shape[0] // b
        fam = self.fams[s]
        u, e = fam.read(x)
        ua, ea = part.ua[s][:, :P], part.ea[s][:, :P]
        fc = fcoef[:, None, :P] if fcoef.shape[1] > 1 else fcoef[:, None]
        ec = ecoef[:, None, :P] if ecoef.shape[1] > 1 else ecoef[:, None]
        du = (ua.unsqueeze(0) - u.view(K, b, P, -1)) * fc.to(u.dtype)
        de = (ea.unsqueeze(0) - e.view(K, b, P, -1)) * ec.to(e.dtype)
        return x + (fam.features.write(du) + de).view(K * b, P, -1)


class FeaturePatcher:
    """Exact node patching of a feature graph: ablate any set of feature / error nodes at once, the rest clean
    (module docstring). ``run(ablate [K, N] | [K, N, P]) -> [K, B]`` metric per prompt; the ``logits`` column
    must be False. ``clean_metric`` / ``ablated_metric`` (every node ablated) ``[B]``.

    ``suffix=True`` (default): each chunk of masks re-runs only the blocks from its first ablated site's block,
    from the recorded clean residual stream (:class:`patching.replay.Replay`, verified against the clean forward
    when the patcher is built; whole forwards where it does not reproduce it). Same numbers either way
    (tests/test_feature_nodes.py)."""

    def __init__(self, model: Any, fgraph: Any, batch: TaskBatch, *, ablation: str = "resample",
                 metric: str | Metric = "logit_diff", reference: TaskBatch | None = None,
                 prompt_batch: int | None = None, chunk_size: int | None = None, max_bytes: int = 512 << 20,
                 suffix: bool = True):
        self.fgraph = fgraph
        self.engine = FeatureEngine(model, fgraph, batch, ablation=ablation, metric=metric, reference=reference,
                                    prompt_batch=prompt_batch, suffix=suffix)
        self.layers = [s.layer for s in fgraph.sites]
        self.batch = self.engine.batch
        self.chunk_size, self.max_bytes = chunk_size, max_bytes
        self.ablations = 0
        self.clean_metric: Float[Tensor, " B"] = torch.cat([p.clean_metric for p in self.engine.parts])
        with torch.no_grad():
            self.ablated_metric: Float[Tensor, " B"] = self.run(fgraph.ablatable().unsqueeze(0))[0]

    @property
    def forward_passes(self) -> int:
        return self.engine.forward_passes

    @property
    def metric_name(self) -> str:
        return self.engine.metric_name

    @property
    def ablatable(self) -> Bool[Tensor, " N"]:
        return self.fgraph.ablatable()

    def _chunk(self, part: Part) -> int:
        if self.chunk_size:
            return self.chunk_size
        return max(1, self.max_bytes // max(1, part.b * row_bytes(self.fgraph, part.P, grad=False)))

    def _check(self, ablate: Tensor) -> Tensor:
        if ablate.dim() not in (2, 3) or ablate.shape[1] != self.fgraph.n_nodes:
            raise ValueError(f"FeaturePatcher.run: masks of shape {tuple(ablate.shape)}, expected [K, "
                             f"{self.fgraph.n_nodes}] or [K, {self.fgraph.n_nodes}, P]")
        if bool(ablate[:, self.fgraph.logits_index].any()):
            raise ValueError("FeaturePatcher.run: the logits column must be False (logits are not ablatable)")
        return ablate.bool()

    def run_logits(self, ablate: Bool[Tensor, "K N"]) -> Float[Tensor, "K B V"]:
        ablate = self._check(ablate)
        eng = self.engine
        out = []
        for part in eng.parts:
            chunks = []
            step = self._chunk(part)
            for k0 in range(0, ablate.shape[0], step):
                m = ablate[k0:k0 + step]
                K = m.shape[0]
                coefs = eng.split_mask(m)
                # per site, the masks that ablate something there: only their rows are re-encoded
                rows = [torch.nonzero(f.flatten(1).any(1) | e.flatten(1).any(1)).flatten() for f, e in coefs]

                def fn(s: int, x: Tensor, _c=coefs, _p=part, _rows=rows, _K=K) -> Tensor | None:
                    f, e = _c[s]
                    idx = _rows[s]
                    if idx.numel() == 0:
                        return None
                    if idx.numel() == _K:
                        return eng.shift(_p, s, x, f, e)
                    xv = x.view(_K, _p.b, *x.shape[1:])
                    sub = eng.shift(_p, s, xv[idx].reshape(-1, *x.shape[1:]), f[idx], e[idx])
                    out = xv.clone()
                    out[idx] = sub.view(idx.numel(), _p.b, *x.shape[1:]).to(out.dtype)
                    return out.view_as(x)
                used = [self.layers[s] for s, r in enumerate(rows) if r.numel()]
                with torch.no_grad():
                    logits = eng.suffix_forward(part, K, min(used), fn) if used else None
                    if logits is None:
                        logits = eng.forward(part.batch.clean.repeat(K, 1), part.batch.pos.repeat(K), fn)
                chunks.append(logits.view(K, part.b, -1))
            out.append(torch.cat(chunks))
        self.ablations += int(ablate.shape[0])
        return torch.cat(out, dim=1)

    def run(self, ablate: Bool[Tensor, "K N"]) -> Float[Tensor, "K B"]:
        logits = self.run_logits(ablate)
        vals = []
        for part in self.engine.parts:
            lp = logits[:, part.rows]
            vals.append(part.metric_fn(lp.float(), part.batch).float())
        return torch.cat(vals, dim=1)


def _node_ids(fgraph: Any, per_position: bool, P: int) -> tuple[str, ...]:
    if not per_position:
        return fgraph.ids
    return tuple(f"{n.id}[{p}]" for n in fgraph.nodes[:-1] for p in range(P))


def feature_node_scores(model: Any, fgraph: Any, batch: TaskBatch, *, method: str = "atp",
                        ablation: str = "mean", metric: str | Metric = "logit_diff", per_position: bool = False,
                        reference: TaskBatch | None = None, steps: int = 5,
                        prompt_batch: int | None = None) -> Scores:
    """Scores of every feature / error node (module docstring), level ``"feature"``: values aligned with
    ``fgraph.ids`` (``logits`` 0), or with ``{node}[{p}]`` for every ablatable node and position when
    ``per_position``."""
    from patching.attribution import check_gradient_metric

    m = _ALIASES.get(method, method)
    if m not in NODE_METHODS:
        raise ValueError(f"feature_node_scores: unknown method {method!r}; choose one of {NODE_METHODS}")
    if m != "patch" and isinstance(metric, str):
        check_gradient_metric("atp" if m == "atp" else "eap_ig", metric, steps=steps if m == "ig" else None)
    if m == "ig" and steps < 1:
        raise ValueError(f"feature_node_scores: steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    P = int(batch.clean.shape[1])
    N = fgraph.n_nodes
    if m == "patch":
        pt = FeaturePatcher(model, fgraph, batch, ablation=ablation, metric=metric, reference=reference,
                            prompt_batch=prompt_batch)
        if per_position:
            eye = torch.eye(N - 1, dtype=torch.bool)
            masks = torch.zeros(N - 1, P, N, P, dtype=torch.bool)
            for p in range(P):
                masks[:, p, :N - 1, p] = eye
            masks = masks.reshape((N - 1) * P, N, P)
        else:
            masks = torch.eye(N, dtype=torch.bool)[:-1]
        with torch.no_grad():
            vals = (pt.run(masks) - pt.clean_metric).mean(-1)
        if not per_position:
            vals = torch.cat([vals, vals.new_zeros(1)])
        fp, eng = pt.forward_passes, pt.engine
    else:
        eng = FeatureEngine(model, fgraph, batch, ablation=ablation, metric=metric, reference=reference,
                            prompt_batch=prompt_batch)
        alphas = [k / steps for k in range(1, steps + 1)]
        acc = torch.zeros(N - 1, P, dtype=torch.float32, device=eng.device)
        for part in eng.parts:
            if m == "atp":
                grads = probe_gradients(eng, part)
            else:  # each site along its own path, the others clean (Marks et al. 2024, app. on IG)
                grads = [probe_gradients(eng, part, alphas, site=s)[s] for s in range(len(fgraph.sites))]
            for s, info in enumerate(fgraph.sites):
                W = eng.fams[s].features.directions.float()
                du = (part.ua[s] - part.u[s]).float()                 # [b, P, n]
                de = (part.ea[s] - part.e[s]).float()                 # [b, P, d]
                fs = (du * (grads[s] @ W.T)).sum(0)                   # [P, n]
                es = (de * grads[s]).sum((0, -1))                     # [P]
                acc[info.first:info.error, :part.P] += fs.T
                acc[info.error, :part.P] += es
        acc /= max(1, len(batch))
        vals = acc.reshape(-1) if per_position else torch.cat([acc.sum(-1), acc.new_zeros(1)])
        fp = eng.forward_passes
    return Scores(graph=fgraph, level="feature", values=vals.detach().float().cpu(),
                  ids=_node_ids(fgraph, per_position, P), method={"patch": "node-patch", "atp": "node-atp",
                                                                  "ig": "node-ig"}[m],
                  ablation=ablation, metric=eng.metric_name, forward_passes=fp, seconds=time.perf_counter() - t0)


def probe_gradients(eng: FeatureEngine, part: Part, alphas: list[float] | None = None,
                    site: int | None = None) -> list[Tensor]:
    """``dm/dx`` at every site's output (``[b, P, d]``, float32; the metric summed over the part's prompts),
    averaged over the points ``alphas`` of site ``site``'s ablation path: that site's candidates and error
    moved ``1 - alpha`` of the way to their ablated values, every other site clean (``None``: the clean run).
    One forward and one backward over ``len(alphas) * b`` rows."""
    A = len(alphas) if alphas is not None and site is not None else 1
    b = part.b
    probes: list[Tensor] = []
    coef = None
    if A > 1 or (site is not None and alphas is not None and alphas[0] != 1.0):
        c = torch.tensor([1.0 - a for a in alphas], device=eng.device).view(A, 1, 1)
        coef = (c.expand(A, 1, eng.fams[site].features.n), c)

    def fn(s: int, x: Tensor) -> Tensor:
        if coef is not None and s == site:
            x = eng.shift(part, s, x, *coef)
        probe = torch.zeros_like(x, requires_grad=True)
        probes.append(probe)
        return x + probe
    tokens, pos = part.batch.clean.repeat(A, 1), part.batch.pos.repeat(A)
    with torch.enable_grad():
        logits = eng.forward(tokens, pos, fn)
        m = part.metric_fn(logits.float().view(A, b, -1), part.batch).float().sum()
        grads = torch.autograd.grad(m, probes, allow_unused=True, materialize_grads=True)
    return [g.float().view(A, b, *g.shape[1:]).mean(0) for g in grads]


__all__ = ["FeaturePatcher", "FeatureEngine", "feature_node_scores", "probe_gradients", "NODE_METHODS",
           "check_sites", "capture_sites", "direct_pairs", "site_hooks", "model_meta"]
