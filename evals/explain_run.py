"""The explanation pipeline behind ``circuitexplain explain``: which units of a circuit, their bases, exemplars,
explanations and scores, one JSON line per unit, and the explanations attached to the circuit graph.

**Units of a circuit** (:func:`plan_units`). The circuit's in-circuit nodes (every node with ``all_nodes``), most
important first: a node's ``score`` when it has one, else the sum of ``|score|`` over its in-circuit edges. Per
node, by level:

- ``neuron``: a head ``a{L}.h{H}`` is one unit (``HeadBasis``: its output norm per token); an MLP ``m{L}`` gives
  its ``per_node`` neurons with the largest mean contribution on the store, ``E|a_i| * ||W_out[i]||``; a neuron
  node ``m{L}.n{I}`` is that neuron;
- ``direction``: the top ``per_node`` principal components of the node's own activation on the store: a head's
  slice of ``blocks.L.attn.hook_z`` (embedded in the whole hook, zero elsewhere), an MLP's
  ``blocks.L.hook_mlp_out`` (``DirectionBasis``, unit ids ``d{L}.{I}@{hook}``);
- ``feature``: the SAE of ``--basis``; its feature nodes ``f{L}.{I}`` when the circuit has them, else the features
  with the largest mean contribution ``E[f_i] * ||W_dec[i]||`` (not tied to a node).

With a ``--basis`` at the neuron or direction level, its units replace the default ones (ranked by mean
contribution). Explicit ``--units`` (unit ids, or node ids meaning that node's units) replace the selection;
``max_units`` caps the list.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuits.convert import owner_node
from explainers.units import hook_short, parse_unit_id

LEVEL_KINDS = {"neuron": ("neuron", "head"), "direction": ("direction",), "feature": ("feature",)}


@dataclass(frozen=True)
class UnitPlan:
    """One unit to explain: its short id, the circuit node it belongs to (``""``: none), the basis (by hook
    key in the run's bases) and its index there, and a label for reading."""

    unit: str
    node: str
    hook: str
    index: int
    label: str = ""


# --------------------------------------------------------------------------------------------- circuit
def node_importance(G: Any, all_nodes: bool = False) -> list[tuple[str, float]]:
    """Nodes (in-circuit unless ``all_nodes``) that own units, most important first (module docstring)."""
    edge_sum: dict[str, float] = defaultdict(float)
    for u, v, d in G.edges(data=True):
        if d.get("in_circuit", False) or all_nodes:
            s = abs(float(d.get("score", 0.0) or 0.0))
            edge_sum[u] += s
            edge_sum[v] += s
    out = []
    for n, d in G.nodes(data=True):
        if d.get("kind") not in ("attn_head", "mlp", "neuron", "feature"):
            continue
        if not (d.get("in_circuit", False) or all_nodes):
            continue
        imp = abs(float(d["score"])) if isinstance(d.get("score"), int | float) else edge_sum.get(n, 0.0)
        out.append((n, imp))
    order = {n: i for i, n in enumerate(G.nodes)}
    return sorted(out, key=lambda t: (-t[1], order[t[0]]))


def node_hook(node: str, level: str) -> str:
    """The store hook holding a circuit node's units at ``level`` (neuron / direction)."""
    if node.startswith("a"):
        return parse_unit_id(node).hook  # blocks.L.attn.hook_z
    L = int(node[1:].split(".")[0])
    return f"blocks.{L}.mlp.hook_post" if level == "neuron" else f"blocks.{L}.hook_mlp_out"


def unit_node(unit: str, G: Any | None) -> str:
    """The circuit node a neuron / head / feature unit belongs to (``""`` when the graph has none)."""
    u = parse_unit_id(unit)
    if G is None:
        return ""
    if u.kind == "head":
        node = u.short
    elif u.kind == "neuron":
        node = owner_node(u.short, G)
    elif u.kind == "feature":
        node = f"f{u.layer}.{u.index}"
    else:
        return ""
    return node if node in G else ""


@dataclass(frozen=True)
class Selection:
    """What to explain, resolved and checked before any weights load: circuit ``nodes`` (their units, by the
    level's rule) and explicit ``units`` (short ids)."""

    nodes: tuple[str, ...]
    units: tuple[str, ...]


_MLP_NODE = re.compile(r"^m(\d+)$")
_FEATURE_NODE = re.compile(r"^f(\d+)\.(\d+)$")


def resolve_selection(G: Any | None, level: str, units: Sequence[str], *, all_nodes: bool = False,
                      basis_hook: str | None = None) -> Selection:
    """The nodes and units a run explains (module docstring); one-line ``ValueError`` for an id that does not
    fit the level."""
    if not units:
        if G is None:
            if level == "feature" and basis_hook is not None:
                return Selection((), ())
            raise ValueError("nothing to explain: give --graph (a circuit) or --units")
        ok = ("feature",) if level == "feature" else ("attn_head", "mlp", "neuron")
        nodes = tuple(n for n, _ in node_importance(G, all_nodes) if G.nodes[n]["kind"] in ok)
        if not nodes and level != "feature":  # features without feature nodes: the SAE's, by contribution
            raise ValueError(f"the circuit has no {'in-circuit ' if not all_nodes else ''}nodes with units at "
                             f"level {level} (heads, MLPs, neurons)")
        return Selection(nodes, ())
    try:
        return _resolve_units(level, units, basis_hook)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("--units") else f"--units: {msg}") from None


def _resolve_units(level: str, units: Sequence[str], basis_hook: str | None) -> Selection:
    nodes, ids = [], []
    for s in units:
        if level == "feature":
            if m := _FEATURE_NODE.match(s):
                if basis_hook is None:
                    raise ValueError(f"--units {s}: features need --basis")
                s = f"f{m[1]}.{m[2]}@{hook_short(basis_hook)}"
            u = parse_unit_id(s)
            if u.kind != "feature":
                raise ValueError(f"--units {s}: a {u.kind}, not a feature (level feature)")
            if basis_hook is not None and u.hook != basis_hook:
                raise ValueError(f"--units {s}: read at {u.hook}, but the --basis SAE reads {basis_hook}")
            ids.append(u.short)
        elif _MLP_NODE.match(s):
            nodes.append(s)
        elif level == "direction":
            u = parse_unit_id(s)
            if u.kind == "head":
                nodes.append(u.short)
            elif u.kind == "direction":
                ids.append(u.short)
            else:
                raise ValueError(f"--units {s}: at level direction give heads or MLPs (a1.h2, m0), whose activations "
                                 f"PCA splits into directions, or direction ids d<L>.<I>@<hook>")
        else:
            u = parse_unit_id(s)
            if u.kind not in ("head", "neuron"):
                raise ValueError(f"--units {s}: a {u.kind}; level neuron explains heads and neurons (a1.h2, m0.n17, "
                                 f"or m0 for an MLP's top neurons)")
            ids.append(u.short)
    return Selection(tuple(dict.fromkeys(nodes)), tuple(dict.fromkeys(ids)))


def needed_hooks(level: str, selection: Selection, G: Any | None, basis_hook: str | None, *,
                 per_node: int | None = None, max_units: int | None = None) -> list[str]:
    """Store hooks a run needs (before any weights are loaded). With ``per_node`` and ``max_units``, a circuit's
    nodes (no explicit units) stop once a lower bound of their units reaches ``max_units``: :func:`plan_units`
    takes units node by node in this order and cuts the list there, so the later nodes' hooks are never read
    (a head or a direction node counts 1, an MLP at the neuron level ``per_node``, a neuron node 0: it may repeat
    one of its MLP's top neurons)."""
    if basis_hook is not None:
        return [basis_hook]
    hooks = {parse_unit_id(s).hook for s in selection.units}
    budget = max_units if (per_node is not None and max_units is not None and not selection.units) else None
    for n in selection.nodes:
        if budget is not None and budget <= 0:
            break
        hooks.add(node_hook(n, level))
        if budget is not None:
            budget -= per_node if (level == "neuron" and _MLP_NODE.match(n)) else 0 if ".n" in n else 1
    return sorted(hooks)


# ---------------------------------------------------------------------------------------------- ranking
@torch.no_grad()
def mean_abs_contribution(store: Any, hook: str, basis: Any, model: Any, *, chunk_rows: int = 8192
                          ) -> torch.Tensor:
    """``E|encode(x)_i| * ||write direction i||`` over every stored row (heads: the norm is the output norm)."""
    total = torch.zeros(int(basis.n_units), dtype=torch.float64)
    n = 0
    device = next(model.parameters()).device
    for s in range(store.n_shards):
        x = store.tensor(s, f"acts.{hook}")
        for a in range(0, x.shape[0], chunk_rows):
            total += basis.encode(x[a:a + chunk_rows].to(device, torch.float32)).abs().sum(0).double().cpu()
            n += min(chunk_rows, x.shape[0] - a)
    mean = total / max(n, 1)
    if basis.kind == "head":
        return mean.float()
    from explainers.unit_explainers import write_directions

    return (mean * write_directions(model, basis).double().norm(dim=-1).cpu()).float()


def _pca_bases(model: Any, store: Any, nodes: Sequence[str], per_node: int, model_name: str
               ) -> tuple[dict[str, Any], list[UnitPlan]]:
    """One ``DirectionBasis`` per hook: PCA of each node's own activation (module docstring)."""
    from explainers.bases import DirectionBasis

    by_hook: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        by_hook[node_hook(n, "direction")].append(n)
    bases, plans = {}, []
    for hook, group in by_hook.items():
        x = store.read(hook)
        rows, labels, owners = [], [], []
        for n in group:
            if n.startswith("a"):
                u = parse_unit_id(n)
                dh = x.shape[1] // int(model.cfg.n_heads)
                sl = slice(u.index * dh, (u.index + 1) * dh)
                part = DirectionBasis.pca(x[:, sl], min(per_node, dh), hook)
                W = torch.zeros(part.n_units, x.shape[1])
                W[:, sl] = part.W_dec
            else:
                part = DirectionBasis.pca(x, min(per_node, x.shape[1]), hook)
                W = part.W_dec
            ratios = part.stats["explained_variance_ratio"]
            for k in range(part.n_units):
                rows.append(W[k])
                labels.append(f"{n} pc{k} ({100 * ratios[k]:.0f}% var)")
                owners.append(n)
        W = torch.stack(rows)
        basis = DirectionBasis(hook, W, x.double().mean(0).float(), W_enc=W.T, method="pca", labels=labels,
                               model=model_name, name=f"pca-{hook_short(hook)}")
        bases[hook] = basis
        plans += [UnitPlan(basis.unit_id(i).short, owners[i], hook, i, labels[i]) for i in range(basis.n_units)]
    return bases, plans


def plan_units(model: Any, store: Any, G: Any | None, level: str, selection: Selection, *,
               basis: Any | None = None, per_node: int = 3, max_units: int = 16, model_name: str = ""
               ) -> tuple[dict[str, Any], list[UnitPlan]]:
    """``(bases by hook, units to explain)``: the selection of the module docstring."""
    from explainers.bases import HeadBasis, NeuronBasis

    bases: dict[str, Any] = {}
    plans: list[UnitPlan] = []
    if basis is not None:
        bases[basis.hook] = basis
        if selection.units:
            plans = [UnitPlan(s, unit_node(s, G), basis.hook, basis.index_of(s), _label(basis, basis.index_of(s)))
                     for s in selection.units]
        elif basis.kind == "feature" and any(_FEATURE_NODE.match(n) for n in selection.nodes):
            for n in selection.nodes:
                m = _FEATURE_NODE.match(n)
                if m and int(m[1]) == basis.layer and int(m[2]) < basis.n_units:
                    plans.append(UnitPlan(basis.unit_id(int(m[2])).short, n, basis.hook, int(m[2])))
        else:
            imp = mean_abs_contribution(store, basis.hook, basis, model)
            for i in torch.argsort(-imp, stable=True)[:max_units].tolist():
                short = basis.unit_id(i).short
                plans.append(UnitPlan(short, unit_node(short, G) if basis.kind != "direction" else "", basis.hook,
                                      i, _label(basis, i) or f"mean contribution {float(imp[i]):.3g}"))
        return bases, plans[:max_units]
    if level == "direction":
        nodes = list(selection.nodes)
        for s in selection.units:  # a direction id: the PCA of the circuit's nodes at its hook
            hook = parse_unit_id(s).hook
            nodes += [n for n in resolve_selection(G, level, ()).nodes if node_hook(n, level) == hook] if G else []
        nodes = list(dict.fromkeys(_owner(n) for n in nodes))
        if not nodes:
            raise ValueError("direction ids need the circuit whose nodes' PCA defines them (--graph)")
        bases, plans = _pca_bases(model, store, nodes, per_node, model_name)
        if selection.units:
            missing = set(selection.units) - {p.unit for p in plans}
            if missing:
                raise ValueError(f"direction unit {sorted(missing)[0]} is not among this run's PCA directions "
                                 f"({', '.join(p.unit for p in plans[:6])}, ...)")
            plans = [p for p in plans if p.unit in selection.units]
        return bases, _round_robin(plans, nodes)[:max_units]

    def basis_for(kind: str, layer: int) -> Any:
        hook = f"blocks.{layer}.attn.hook_z" if kind == "head" else f"blocks.{layer}.mlp.hook_post"
        if hook not in bases:
            bases[hook] = (HeadBasis if kind == "head" else NeuronBasis).from_model(
                model, layer, model_name=model_name)
        return bases[hook]

    for s in selection.units:
        u = parse_unit_id(s)
        b = basis_for(u.kind, u.layer)
        plans.append(UnitPlan(u.short, unit_node(u.short, G), b.hook, b.index_of(u.short)))
    for n in selection.nodes:
        if m := _MLP_NODE.match(n):
            b = basis_for("neuron", int(m[1]))
            imp = mean_abs_contribution(store, b.hook, b, model)
            for i in torch.argsort(-imp, stable=True)[:per_node].tolist():
                plans.append(UnitPlan(b.unit_id(i).short, n, b.hook, i, f"mean |a| x |W_out| = {float(imp[i]):.3g}"))
        else:
            u = parse_unit_id(n)
            b = basis_for(u.kind, u.layer)
            plans.append(UnitPlan(u.short, n, b.hook, int(u.index)))
    seen: set[str] = set()
    plans = [p for p in plans if not (p.unit in seen or seen.add(p.unit))]
    return bases, plans[:max_units]


def _owner(n: str) -> str:
    return owner_node(n)  # neuron m0.n3 -> m0


def _label(basis: Any, i: int) -> str:
    labels = getattr(basis, "labels", ())
    return labels[i] if i < len(labels) else ""


def _round_robin(plans: Sequence[UnitPlan], nodes: Sequence[str]) -> list[UnitPlan]:
    """Nodes in importance order, each node's components in order (the list is cut at ``max_units``)."""
    rank = {n: i for i, n in enumerate(nodes)}
    return sorted(plans, key=lambda p: (rank.get(p.node, len(rank)), p.index))


# --------------------------------------------------------------------------------------------- results
class ResultsFile:
    """``explanations.jsonl``: one JSON object per unit, each line appended with one write and fsynced. A last
    line cut off by a crash is dropped on load (the unit is redone); any other bad line is an error naming it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lines: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        parts = raw.split(b"\n")
        complete, tail = parts[:-1], parts[-1]
        for k, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                self.lines[obj["unit"]] = obj
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{k}: not an explanation record ({e}); move the file away") from None
        if tail.strip():  # an unfinished last line: keep the complete ones only
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"\n".join(complete) + b"\n" if complete else b"")
            os.replace(tmp, self.path)

    def __contains__(self, unit: str) -> bool:
        return unit in self.lines

    def append(self, obj: Mapping[str, Any]) -> None:
        data = (json.dumps(obj, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.lines[obj["unit"]] = dict(obj)


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted key of the first difference between two JSON-like values (``None`` when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}{k}"
            diff = first_difference(a[k], b[k], f"{where}{k}.")
            if diff:
                return diff
        return None
    return None if a == b else (where.rstrip(".") or "value")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------------------ graph
def attach_explanations(G: Any, lines: Iterable[Mapping[str, Any]], scorers: Sequence[str]) -> Any:
    """A copy of ``G`` with node attributes (scalars and strings only): ``explanation`` (the best-scoring unit of
    the node, by the first scorer; prefixed with the unit id when the unit is inside the node), ``explanation_unit``,
    ``explanation_explainer``, ``explanation_score_<scorer>`` (left out when undefined), and ``explanations``
    (every explained unit of the node: ``unit [score]: text``, best first)."""
    H = G.copy()
    by_node: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        if line.get("node") and line["node"] in H:
            by_node[line["node"]].append(line)
    first = scorers[0] if scorers else None

    def key(line: Mapping[str, Any]) -> tuple[int, float]:
        s = line.get("scores", {}).get(first) if first else None
        ok = line.get("explanation") is not None
        return (0 if ok and s is not None else 1 if ok else 2, -(s if s is not None else 0.0))

    for node, group in by_node.items():
        group = sorted(group, key=key)
        best = group[0]
        text = best.get("explanation") or f"(failed: {best.get('explanation_failed')})"
        d = H.nodes[node]
        d["explanation"] = text if best["unit"] == node else f"{best['unit']}: {text}"
        d["explanation_unit"] = best["unit"]
        d["explanation_explainer"] = best.get("explainer", "")
        for name in scorers:
            s = best.get("scores", {}).get(name)
            if s is not None:
                d[f"explanation_score_{name}"] = float(s)
        parts = []
        for line in group:
            s = line.get("scores", {}).get(first) if first else None
            score = f" [{first} {s:.2f}]" if s is not None else ""
            parts.append(f"{line['unit']}{score}: {line.get('explanation') or '(failed)'}")
        d["explanations"] = " | ".join(parts)
    return H
