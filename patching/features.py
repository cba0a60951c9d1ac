"""Feature circuits: SAE features and error terms of spliced sites as circuit units (Marks et al. 2024,
*Sparse Feature Circuits*).

A *site* is a hook with a :class:`patching.basis.Basis` spliced in (an SAE): its activation is
``x = u @ W + b + err`` with ``u = encode(x)`` the feature activations, ``W`` the decoder rows and ``err`` the
reconstruction error, kept so that nothing the SAE misses is dropped. The :class:`FeatureGraph` of a set of
sites has

* **feature nodes** ``f{L}.{I}@{hook-short}`` (the unit vocabulary of ``explainers/units.py``): only the
  *candidates* of each site, the features active on the task (max ``|u|`` over the real non-BOS tokens of the
  clean and corrupted prompts above ``min_activation``), the ``max_features_per_site`` of largest total
  ``|u|`` there. Every other feature of the site stays clean in every run: a feature circuit is a circuit over
  the candidates only;
* one **error node** ``err@{hook-short}`` per site;
* ``logits``.

Edges go from every feature / error node of a site ``s`` to every candidate feature of a later site ``s'``
that ``s`` reaches *directly*, i.e. along some path that does not pass through a third spliced site, and to
``logits`` (likewise directly). Which site pairs are direct is read off the autograd graph of one forward in
which every site outputs a fresh leaf (:meth:`FeatureGraph.build`): with residual-stream sites at every layer
only consecutive layers connect (Marks et al. connect ``resid_{l-1}`` to ``attn_l``, ``mlp_l``, ``resid_l``,
which is what this rule gives for those sites), so the graph holds no edge that is zero by construction.
Edge semantics and the scoring methods: :mod:`patching.features_attr`; node ablation:
:class:`patching.features_run.FeaturePatcher`; docs/features.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from patching import units
from patching.ablation import bos_token_id, mean_weights
from patching.basis import Basis
from patching.batch import TaskBatch
from patching.graph import Edge
from patching.senders import ErrorFamily, FeatureFamily, SpliceSite

FEATURE_KINDS = ("feature", "error", "logits")


def hook_short(hook: str) -> str:
    """``blocks.3.hook_resid_pre`` -> ``3.resid_pre``: :func:`patching.units.hook_short` (the one rule, which
    ``explainers.units`` re-exports) for block hooks only (features live in blocks)."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_") \
            or parts[-1] == "hook_":
        raise ValueError(f"{hook!r} is not a block hook (blocks.<layer>....hook_<name>): features live in blocks")
    return units.hook_short(hook)


def hook_layer(hook: str) -> int:
    return int(hook.split(".")[1])


@dataclass(frozen=True)
class FeatureNode:
    """One unit: ``kind`` feature / error / logits; ``index`` the feature's index in its SAE; ``sae`` the SAE's
    name; ``site`` the index of its site in :attr:`FeatureGraph.sites` (``None`` for logits)."""

    id: str
    kind: str
    layer: int | None
    index: int | None = None
    hook: str = ""
    sae: str = ""
    site: int | None = None

    @property
    def head(self) -> None:  # the component-graph Node interface
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "index": self.index, "hook": self.hook,
                "sae": self.sae, "site": self.site}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureNode:
        return cls(d["id"], d["kind"], d.get("layer"), d.get("index"), d.get("hook", ""), d.get("sae", ""),
                   d.get("site"))


@dataclass(frozen=True)
class SiteInfo:
    """A spliced hook: its SAE name, sizes, candidate features and the node indices of its units."""

    hook: str
    short: str
    layer: int
    sae: str
    n_units: int
    d: int
    candidates: tuple[int, ...]
    first: int          # node index of its first candidate
    error: int          # node index of its error node

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "short": self.short, "layer": self.layer, "sae": self.sae,
                "n_units": self.n_units, "d": self.d, "candidates": list(self.candidates), "first": self.first,
                "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiteInfo:
        return cls(d["hook"], d["short"], int(d["layer"]), d["sae"], int(d["n_units"]), int(d["d"]),
                   tuple(int(i) for i in d["candidates"]), int(d["first"]), int(d["error"]))


@dataclass(frozen=True, eq=False)
class FeatureGraph:
    """Feature / error / logits nodes of spliced sites and the edges between them (module docstring).

    Attributes:
        sites: the spliced hooks in forward order.
        nodes: per site its candidates (by feature index) then its error node; ``logits`` last.
        edges: grouped by receiver in node order (logits last), senders in node order within a receiver.
        bases: hook -> basis (not serialised: :meth:`from_dict` takes them again).
        direct: ``(s, s')`` site-index pairs connected directly (``s' == len(sites)`` is the logits).
        meta: json-able facts (logits hook, model name, ...).
    """

    sites: tuple[SiteInfo, ...]
    nodes: tuple[FeatureNode, ...]
    edges: tuple[Edge, ...]
    bases: Mapping[str, Basis] = field(repr=False)
    direct: tuple[tuple[int, int], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    node_index: dict[str, int] = field(init=False, repr=False)
    edge_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_index", {n.id: i for i, n in enumerate(self.nodes)})
        object.__setattr__(self, "edge_index", {e.id: i for i, e in enumerate(self.edges)})
        if len(self.node_index) != len(self.nodes):
            raise ValueError("FeatureGraph: duplicate node ids")

    # ---------------------------------------------------------------------------------------------- views
    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)

    @property
    def edge_ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.edges)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def logits_index(self) -> int:
        return len(self.nodes) - 1

    @property
    def supports_edges(self) -> bool:
        return True

    def node(self, node_id: str) -> FeatureNode:
        if node_id not in self.node_index:
            raise KeyError(f"no node {node_id!r} in the feature graph")
        return self.nodes[self.node_index[node_id]]

    def site_nodes(self, s: int) -> range:
        """Node indices of site ``s``'s units (candidates then error)."""
        return range(self.sites[s].first, self.sites[s].error + 1)

    def ablatable(self) -> Bool[Tensor, " N"]:
        """Every feature and error node (the all-ablated mask); ``logits`` False."""
        m = torch.ones(self.n_nodes, dtype=torch.bool)
        m[self.logits_index] = False
        return m

    def node_mask(self, ids: list[str] | tuple[str, ...] | set[str]) -> Bool[Tensor, " N"]:
        m = torch.zeros(self.n_nodes, dtype=torch.bool)
        for i in ids:
            m[self.node_index[self.node(i).id]] = True
        return m

    def families(self, device: torch.device | str | None = None) -> tuple[SpliceSite, ...]:
        """One :class:`patching.senders.SpliceSite` per site (needs :attr:`bases`)."""
        out = []
        for s in self.sites:
            if s.hook not in self.bases:
                raise ValueError(f"FeatureGraph: no basis for site {s.hook!r} (pass bases= to from_dict)")
            b = self.bases[s.hook]
            idx = torch.tensor(s.candidates, dtype=torch.long, device=device)
            out.append(SpliceSite(FeatureFamily(s.hook, b, idx), ErrorFamily(s.hook, b)))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"level": "feature", "sites": [s.to_dict() for s in self.sites],
                "nodes": [n.to_dict() for n in self.nodes],
                "edges": [[e.sender, e.receiver] for e in self.edges],
                "direct": [list(p) for p in self.direct], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], bases: Mapping[str, Basis] | None = None) -> FeatureGraph:
        return cls(tuple(SiteInfo.from_dict(s) for s in d["sites"]),
                   tuple(FeatureNode.from_dict(n) for n in d["nodes"]),
                   tuple(Edge(s, r) for s, r in d["edges"]), dict(bases or {}),
                   tuple((int(a), int(b)) for a, b in d.get("direct", ())), dict(d.get("meta", {})))

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model: Any, sites: Mapping[str, Basis], batch: TaskBatch, *,
              max_features_per_site: int | None = 64, min_activation: float = 0.0,
              sae_names: Mapping[str, str] | None = None) -> FeatureGraph:
        """The feature graph of ``sites`` (hook -> basis) on ``batch``'s prompts (module docstring).

        Candidates of a site: features whose largest ``|activation|`` over the real, non-BOS tokens of the
        clean and the corrupted prompts exceeds ``min_activation``; of those the ``max_features_per_site``
        (``None``: all) with the largest sum of ``|activation|`` there (ties: lower index), listed by index.
        ``sae_names``: hook -> the SAE's name recorded on its nodes (default: the basis' ``name`` attribute,
        else its class name).
        """
        from patching.features_run import capture_sites, check_sites, direct_pairs, model_meta

        check_sites(model, sites)
        if max_features_per_site is not None and max_features_per_site < 0:
            raise ValueError(f"max_features_per_site must be >= 0 or None, got {max_features_per_site}")
        meta = model_meta(model)
        order = capture_sites(model, sites, batch.clean[:1])[1]  # forward order of the site hooks
        names = dict(sae_names or {})
        bos = bos_token_id(model)
        w = mean_weights(batch, bos=bos).float()
        if not bool(w.any()):
            w = mean_weights(batch).float()
        infos: list[SiteInfo] = []
        nodes: list[FeatureNode] = []
        with torch.no_grad():
            xc = capture_sites(model, sites, batch.clean)[0]
            xr = capture_sites(model, sites, batch.corrupt)[0]
            for s, hook in enumerate(order):
                b = sites[hook]
                wk = w.to(xc[hook].device)
                mass = torch.zeros(b.n_units, dtype=torch.float32, device=xc[hook].device)
                peak = torch.zeros_like(mass)
                for x in (xc[hook], xr[hook]):
                    a = b.encode(x.to(b.directions.dtype)).float().abs() * wk[..., None]
                    mass += a.sum((0, 1))
                    peak = torch.maximum(peak, a.amax((0, 1)))
                active = torch.nonzero(peak > min_activation).flatten()
                rank = torch.argsort(-mass[active], stable=True)
                keep = active[rank]
                if max_features_per_site is not None:
                    keep = keep[:max_features_per_site]
                cand = tuple(sorted(int(i) for i in keep.tolist()))
                L, short = hook_layer(hook), hook_short(hook)
                sae = names.get(hook) or str(getattr(b, "name", "") or type(b).__name__)
                first = len(nodes)
                nodes += [FeatureNode(f"f{L}.{i}@{short}", "feature", L, i, hook, sae, s) for i in cand]
                nodes.append(FeatureNode(f"err@{short}", "error", L, None, hook, sae, s))
                infos.append(SiteInfo(hook, short, L, sae, int(b.n_units), int(b.d_in), cand, first,
                                      len(nodes) - 1))
        nodes.append(FeatureNode("logits", "logits", None, None, meta["logits_hook"], "", None))
        direct = direct_pairs(model, sites, order, batch.clean[:1])
        edges: list[Edge] = []
        for r, info in enumerate(infos):
            senders = [nodes[i].id for s, r2 in direct if r2 == r for i in range(infos[s].first, infos[s].error + 1)]
            for i in info.candidates:
                rid = f"f{info.layer}.{i}@{info.short}"
                edges += [Edge(u, rid) for u in senders]
        logit_senders = [nodes[i].id for s, r2 in direct if r2 == len(infos)
                         for i in range(infos[s].first, infos[s].error + 1)]
        edges += [Edge(u, "logits") for u in logit_senders]
        meta.update(sites=list(order), max_features_per_site=max_features_per_site, min_activation=min_activation,
                    n_prompts=len(batch))
        return cls(tuple(infos), tuple(nodes), tuple(edges), {h: sites[h] for h in order}, tuple(direct), meta)


# the scoring API lives in its own modules (they import nothing from here at import time); exported here
from patching.features_attr import feature_edge_scores  # noqa: E402
from patching.features_run import FeaturePatcher, feature_node_scores  # noqa: E402

__all__ = ["FeatureGraph", "FeatureNode", "SiteInfo", "hook_short", "FEATURE_KINDS", "feature_node_scores",
           "feature_edge_scores", "FeaturePatcher"]
