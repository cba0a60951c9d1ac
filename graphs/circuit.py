"""Circuits as ``networkx.DiGraph``: the schema every package reads and writes.

A circuit graph stores every scored component (node) and every scored connection (edge) of a model,
with the ones kept in the circuit marked ``in_circuit``. It is pure networkx + stdlib (no torch), so
it can be saved, loaded, compared and exported anywhere.

Node ids (the engine's component ids): ``embed``, ``pos_embed``, ``a{L}.h{H}`` (attention head),
``m{L}`` (MLP), ``m{L}.n{I}`` (MLP neuron), ``f{L}.{I}@{hook-short}`` (feature ``I`` of the SAE spliced at
that hook; the older ``f{L}.{I}`` without a site is still read), ``err@{hook-short}`` (the reconstruction
error of that SAE: everything it misses), ``b{L}`` (whole block), ``logits``. ``hook-short`` is the hook
without ``blocks.`` and the ``hook_`` of its last part (``blocks.1.hook_resid_post`` -> ``1.resid_post``;
``explainers/units.py``); its layer must be the node's. More kinds are added with
:func:`register_node_kind` (their id pattern, attributes, input or not, attention or MLP stage);
:mod:`circuits.convert` registers every unit kind of the engine (:data:`patching.kinds.KINDS`) there, so a
kind defined in one class of the engine needs no edit here.

Node attributes: ``kind``, ``layer`` (``-1`` for ``embed``/``pos_embed``; absent or after the last
layer for ``logits``), ``head`` (attention heads), ``index`` (neurons, features), ``hook`` (the
TransformerLens hook, when known), ``score`` (float), ``in_circuit`` (bool). Feature-circuit nodes
(kinds ``feature`` and ``error``; patching/features.py, docs/features.md) also carry ``sae`` (the name of
the SAE the unit belongs to, e.g. its directory name) and ``hook`` (the SAE's site).

Edge attributes: a DiGraph keeps one edge per (sender, receiver). An attention receiver reads up to
three inputs, so such an edge is *split*: it carries ``score_q/k/v`` and ``in_circuit_q/k/v`` for the
inputs that were scored, ``input`` = the in-circuit inputs joined by commas (``"k"``, ``"q,k"``),
``score`` = the per-input score of largest magnitude (signed) and ``in_circuit`` = any input in
circuit. A plain edge (any other receiver) carries ``score``, ``in_circuit`` and ``input = ""``.

Graph attributes: ``model, task, method, ablation, metric, seed, version, created`` (set by
:func:`new_circuit`), optionally ``faithfulness, level, forward_passes, seconds`` and any other
scalar. Every attribute value is a bool, int, float or str (no ``None``, lists or dicts) so that
GraphML and GEXF can carry it; an absent attribute means "not applicable".

Scores follow the engine: the mean change of the metric when the unit is ablated,
``m(ablated) - m(clean)``; a negative score means the unit supports the task.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import networkx as nx

SITE_KINDS = ("feature", "error")  # units of a spliced SAE site: may connect within one layer
QKV = ("q", "k", "v")
REQUIRED_GRAPH_ATTRS = ("model", "task", "method", "ablation", "metric", "seed", "version", "created")
_INT_ATTRS = ("layer", "head", "index")


@dataclass(frozen=True)
class NodeKind:
    """One kind of circuit node as the schema knows it (:func:`register_node_kind`): its ids (``pattern``, a
    full-match regex whose groups give the int attributes ``fields``), whether it is a model input (before
    layer 0, ``layer = -1``; receives nothing), its ``stage`` in its layer (0: the attention stage, read
    by the layer's MLP stage; 1: the MLP stage) and the split ``inputs`` (of q, k, v) its incoming edges may be
    scored per (attention heads); ``logits`` is the one sink (after every layer)."""

    name: str
    pattern: str
    fields: tuple[str, ...] = ()
    is_input: bool = False
    stage: int = 1
    inputs: tuple[str, ...] = ()
    regex: re.Pattern[str] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


#: Node kinds by name, in registration order (the built-in ones first; :func:`register_node_kind` adds more).
_NODE_KINDS: dict[str, NodeKind] = {}
#: Kind names in drawing order within a column (:func:`positions`); grows with :func:`register_node_kind`.
KINDS: tuple[str, ...] = ()
#: The model-input kinds (``embed``, ``pos_embed`` and any registered input kind).
INPUT_KINDS: tuple[str, ...] = ()


def register_node_kind(kind: str, pattern: str, fields: tuple[str, ...] | list[str] = (), *,
                       is_input: bool = False, stage: int = 1, inputs: tuple[str, ...] | list[str] = ()) -> NodeKind:
    """Make ``kind`` a node kind of the schema: ids fully matching the regex ``pattern`` parse as it, its
    groups giving the int node attributes ``fields`` (of ``layer``, ``head``, ``index``, in group order).

    ``is_input``: a model input (``layer = -1``, before every layer, receives no edges; ``stage`` is not used).
    ``stage``: 0 when the kind writes in the attention stage of its layer (before the layer's MLP), 1 in the MLP
    stage; it orders edges within a layer (:func:`validate`) and places drawing columns (:func:`draw_column`).
    ``inputs``: the q / k / v inputs whose edges are split (scored per input, :func:`add_connection`); none: every
    edge into the kind is a plain edge.
    Ids are tried against the kinds in registration order, so a new pattern must not match another kind's
    ids. Registering the same definition again does nothing; a different definition for a registered name
    raises a one-line ``ValueError``. (:mod:`circuits.convert` registers every unit kind of the engine,
    :data:`patching.kinds.KINDS`, so a kind defined there needs no edit here.)
    """
    global KINDS, INPUT_KINDS
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kind):
        raise ValueError(f"register_node_kind: kind must be an identifier, got {kind!r}")
    fields = tuple(fields)
    bad = [f for f in fields if f not in _INT_ATTRS] + (["layer"] if is_input and "layer" in fields else [])
    if bad or len(set(fields)) != len(fields):
        raise ValueError(f"register_node_kind {kind!r}: fields {fields} must be distinct ones of {_INT_ATTRS}"
                         f"{' (an input has no layer of its own)' if is_input else ''}")
    if isinstance(stage, bool) or stage not in (0, 1):
        raise ValueError(f"register_node_kind {kind!r}: stage must be 0 (attention) or 1 (MLP), got {stage!r}")
    inputs = tuple(inputs)
    if any(x not in QKV for x in inputs) or len(set(inputs)) != len(inputs) or (is_input and inputs):
        raise ValueError(f"register_node_kind {kind!r}: inputs {inputs} must be distinct ones of {QKV}"
                         f"{' (an input receives nothing)' if is_input else ''}")
    try:
        new = NodeKind(kind, pattern, fields, bool(is_input), 0 if is_input else int(stage), inputs)
    except (re.error, TypeError) as e:
        raise ValueError(f"register_node_kind {kind!r}: pattern {pattern!r} is not a regex ({e})") from None
    if new.regex.groups != len(fields):
        raise ValueError(f"register_node_kind {kind!r}: pattern {pattern!r} has {new.regex.groups} groups for "
                         f"fields {fields}")
    old = _NODE_KINDS.get(kind)
    if old is not None:
        if old != new:
            raise ValueError(f"node kind {kind!r} is already registered as {old} (not {new})")
        return old
    _NODE_KINDS[kind] = new
    KINDS = (*KINDS, kind)
    if new.is_input:
        INPUT_KINDS = (*INPUT_KINDS, kind)
    return new


def node_kind(kind: str) -> NodeKind | None:
    """The registered :class:`NodeKind` named ``kind``, ``None`` when there is none."""
    return _NODE_KINDS.get(kind)


register_node_kind("embed", r"embed", is_input=True)
register_node_kind("pos_embed", r"pos_embed", is_input=True)
register_node_kind("logits", r"logits")
register_node_kind("attn_head", r"a(\d+)\.h(\d+)", ("layer", "head"), stage=0, inputs=QKV)
register_node_kind("mlp", r"m(\d+)", ("layer",))
register_node_kind("neuron", r"m(\d+)\.n(\d+)", ("layer", "index"))
register_node_kind("feature", r"f(\d+)\.(\d+)(?:@(?:\1)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?", ("layer", "index"))
register_node_kind("error", r"err@(\d+)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*", ("layer",))
register_node_kind("block", r"b(\d+)", ("layer",))
#: The kinds built into the schema (the rest were registered).
BUILTIN_KINDS = tuple(_NODE_KINDS)
# drawing order of the built-in kinds (the id patterns above are tried in their own order)
KINDS = ("embed", "pos_embed", "attn_head", "mlp", "neuron", "feature", "error", "block", "logits")
_EDGE_ID = re.compile(r"(?P<sender>[^<>]+?)->(?P<receiver>[^<>]+?)(?:<(?P<input>[qkv])>)?")


class EdgeInput(NamedTuple):
    """One scored input of one edge: the engine's unit of edge-level circuits."""

    sender: str
    receiver: str
    input: str | None  # "q" | "k" | "v" for split attention edges, None for plain edges
    score: float | None
    in_circuit: bool

    @property
    def id(self) -> str:
        return edge_id(self.sender, self.receiver, self.input)


def package_version() -> str:
    """The installed ``circuitexplain`` version, or ``"0+unknown"`` outside an install."""
    try:
        return version("circuitexplain")
    except PackageNotFoundError:
        return "0+unknown"


def parse_node_id(s: str) -> dict[str, Any]:
    """Parse a component id: ``"a1.h3"`` -> ``{"kind": "attn_head", "layer": 1, "head": 3}``.

    ``embed`` and ``pos_embed`` get ``layer = -1``; ``logits`` has no layer (it is drawn after the last).
    Raises ``ValueError`` for anything that is not a component id.
    """
    if isinstance(s, str):
        for k in _NODE_KINDS.values():
            m = k.regex.fullmatch(s)
            if m:
                out: dict[str, Any] = {"kind": k.name}
                if k.is_input:
                    out["layer"] = -1
                out.update({f: int(g) for f, g in zip(k.fields, m.groups(), strict=True)})
                return out
    more = [f"{k.name} ({k.pattern})" for k in _NODE_KINDS.values() if k.name not in BUILTIN_KINDS]
    raise ValueError(
        f"bad node id {s!r}: expected embed, pos_embed, a<L>.h<H>, m<L>, m<L>.n<I>, f<L>.<I>[@<L>.<site>], "
        f"err@<L>.<site>, b<L> or logits" + (f", or an id of a registered kind: {', '.join(more)}" if more else "")
    )


def edge_id(sender: str, receiver: str, input: str | None = None) -> str:
    """The engine's edge id: ``a0.h1->a1.h2<k>`` for an attention input, ``m0->logits`` otherwise."""
    return f"{sender}->{receiver}<{input}>" if input else f"{sender}->{receiver}"


def parse_edge_id(s: str) -> tuple[str, str, str | None]:
    """``"a0.h1->a1.h2<k>"`` -> ``("a0.h1", "a1.h2", "k")``; raises ``ValueError`` if malformed."""
    m = _EDGE_ID.fullmatch(s) if isinstance(s, str) else None
    if not m:
        raise ValueError(f"bad edge id {s!r}: expected SENDER->RECEIVER or SENDER->RECEIVER<q|k|v>")
    parse_node_id(m["sender"])
    parse_node_id(m["receiver"])
    return m["sender"], m["receiver"], m["input"]


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: attribute values must be finite")
        return
    raise ValueError(
        f"{where} is {type(value).__name__} {value!r}: attribute values must be bool, int, float or str"
    )


def _as_float(value: Any, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{where} must be finite, got {out}")
    return out


def new_circuit(*, model: str, task: str, method: str, ablation: str, metric: str, seed: int,
                **extra_graph_attrs: Any) -> nx.DiGraph:
    """An empty circuit graph with its provenance as graph attributes.

    ``version`` (the package version) and ``created`` (UTC ISO time) are filled in; extra attributes
    (``faithfulness``, ``level``, ``forward_passes``, ``seconds`` ...) must be scalars; ``None`` values
    are left out (absent = not applicable).
    """
    attrs: dict[str, Any] = {
        "model": str(model), "task": str(task), "method": str(method), "ablation": str(ablation),
        "metric": str(metric), "seed": int(seed), "version": package_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for key, value in extra_graph_attrs.items():
        if value is None:
            continue
        if key in ("faithfulness", "seconds"):
            value = _as_float(value, f"graph attribute {key!r}")
        elif key == "forward_passes":
            value = int(value)
        _check_scalar(value, f"graph attribute {key!r}")
        attrs[key] = value
    G = nx.DiGraph()
    G.graph.update(attrs)
    return G


def add_component(G: nx.DiGraph, node_id: str, *, kind: str, layer: int | None, head: int | None = None,
                  index: int | None = None, hook: str = "", score: float | None = None,
                  in_circuit: bool = True, **attrs: Any) -> None:
    """Add (or update) the component ``node_id`` in place; its id must agree with kind/layer/head/index.

    ``layer=None`` is allowed for ``embed``/``pos_embed`` (stored as -1) and ``logits`` (left absent).
    ``None`` values are left out; other extra attributes must be scalars.
    """
    parsed = parse_node_id(node_id)
    if kind != parsed["kind"]:
        raise ValueError(f"node {node_id}: kind {kind!r} does not match its id (expected {parsed['kind']!r})")
    given = {"layer": layer, "head": head, "index": index}
    if kind in INPUT_KINDS and layer is None:
        given["layer"] = -1
    for field in _INT_ATTRS:
        value = given[field]
        if value is None:
            if field in parsed:
                given[field] = parsed[field]
            continue
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"node {node_id}: {field} must be an int, got {value!r}")
        value = given[field] = int(value)
        if field in parsed and parsed[field] != value:
            raise ValueError(f"node {node_id}: {field}={value} does not match its id ({parsed[field]})")
        if field not in parsed and not (kind == "logits" and field == "layer"):
            raise ValueError(f"node {node_id}: a {kind} node has no {field}")
    data: dict[str, Any] = {"kind": kind, **{k: v for k, v in given.items() if v is not None}}
    if hook:
        data["hook"] = str(hook)
    if score is not None:
        data["score"] = _as_float(score, f"node {node_id}: score")
    data["in_circuit"] = bool(in_circuit)
    for key, value in attrs.items():
        if value is None:
            continue
        _check_scalar(value, f"node {node_id}: attribute {key!r}")
        data[key] = value
    G.add_node(node_id, **data)


def _stage(kind: str) -> int:
    """0 for a kind written in the attention stage of its layer (and the inputs), 1 for the rest."""
    k = _NODE_KINDS.get(kind)
    return 1 if k is None else k.stage


def _split_inputs(kind: Any) -> tuple[str, ...]:
    k = _NODE_KINDS.get(kind) if isinstance(kind, str) else None
    return () if k is None else k.inputs


def _other_split_kinds() -> str:
    """Registered kinds other than ``attn_head`` with split inputs (``", kv_head"``), for error messages."""
    return "".join(f", {k.name}" for k in _NODE_KINDS.values() if k.inputs and k.name != "attn_head")


def _refresh_split_edge(data: dict[str, Any]) -> None:
    """Recompute ``input``, ``score`` and ``in_circuit`` of a split edge from its per-input attrs."""
    data["input"] = ",".join(x for x in QKV if data.get(f"in_circuit_{x}", False))
    data["in_circuit"] = any(data.get(f"in_circuit_{x}", False) for x in QKV)
    scores = [data[f"score_{x}"] for x in QKV if f"score_{x}" in data]
    if scores:
        data["score"] = max(scores, key=abs)  # first of largest magnitude, in q, k, v order
    else:
        data.pop("score", None)


def add_connection(G: nx.DiGraph, sender: str, receiver: str, *, input: str | None = None,
                   score: float | None = None, in_circuit: bool = True) -> None:
    """Add (or update) the connection ``sender -> receiver`` in place.

    For attention receivers pass ``input`` in ``q``/``k``/``v``: calls for the same pair with different
    inputs merge into one split edge (per-input ``score_x``/``in_circuit_x`` plus the summary
    ``input``/``score``/``in_circuit``). ``input=None`` adds a plain edge (used by every other receiver,
    or attention receivers whose inputs are not split).
    """
    for node in (sender, receiver):
        if node not in G:
            raise ValueError(f"edge {edge_id(sender, receiver, input)}: node {node} is not in the graph "
                             "(add it with add_component first)")
    if input is not None and input not in QKV:
        raise ValueError(f"edge {edge_id(sender, receiver)}: input must be q, k, v or None, got {input!r}")
    split_inputs = _split_inputs(G.nodes[receiver].get("kind"))
    if input is not None and not split_inputs:
        more = _other_split_kinds()
        raise ValueError(f"edge {edge_id(sender, receiver, input)}: only attention heads have q/k/v inputs"
                         + (f" (and {more[2:]})" if more else ""))
    if input is not None and input not in split_inputs:
        raise ValueError(f"edge {edge_id(sender, receiver, input)}: a {G.nodes[receiver]['kind']} has no {input} "
                         f"input (only {', '.join(split_inputs)})")
    eid = edge_id(sender, receiver, input)
    value = None if score is None else _as_float(score, f"edge {eid}: score")
    data = dict(G.edges[sender, receiver]) if G.has_edge(sender, receiver) else {}
    split = any(f"in_circuit_{x}" in data for x in QKV)
    if data and split != (input is not None):
        raise ValueError(f"edge {eid}: cannot mix a plain edge and per-input (q/k/v) edges for one pair")
    if input is None:
        data = {"input": "", "in_circuit": bool(in_circuit)}
        if value is not None:
            data["score"] = value
    else:
        data[f"in_circuit_{input}"] = bool(in_circuit)
        if value is not None:
            data[f"score_{input}"] = value
        else:
            data.pop(f"score_{input}", None)
        _refresh_split_edge(data)
    if G.has_edge(sender, receiver):
        G.edges[sender, receiver].clear()
    G.add_edge(sender, receiver, **data)


def is_split(data: dict[str, Any]) -> bool:
    """Whether an edge's attribute dict carries per-input (q/k/v) attributes."""
    return any(f"in_circuit_{x}" in data or f"score_{x}" in data for x in QKV)


def edge_inputs(G: nx.DiGraph) -> Iterator[EdgeInput]:
    """Every scored input of every edge, in edge order and q, k, v order within an edge."""
    for u, v, data in G.edges(data=True):
        if is_split(data):
            for x in QKV:
                if f"in_circuit_{x}" in data or f"score_{x}" in data:
                    yield EdgeInput(u, v, x, data.get(f"score_{x}"), bool(data.get(f"in_circuit_{x}", False)))
        else:
            yield EdgeInput(u, v, None, data.get("score"), bool(data.get("in_circuit", False)))


def edge_ids(G: nx.DiGraph, in_circuit_only: bool = True) -> list[str]:
    """Engine edge ids (``a0.h1->a1.h2<k>``, ``m0->logits``) of the graph's (in-circuit) edge inputs."""
    return [e.id for e in edge_inputs(G) if e.in_circuit or not in_circuit_only]


def node_ids(G: nx.DiGraph, in_circuit_only: bool = True) -> list[str]:
    """Node ids of the graph, only those marked ``in_circuit`` by default, in insertion order."""
    return [n for n, d in G.nodes(data=True) if d.get("in_circuit", False) or not in_circuit_only]


def _order_key(d: dict[str, Any]) -> tuple[float, int]:
    """Where a component sits in the forward pass: (layer, 0 attention / 1 the rest)."""
    kind = d["kind"]
    if kind == "logits":
        return (math.inf, 0)
    return (d.get("layer", -1), _stage(kind))


def validate(G: Any) -> None:
    """Check ``G`` follows the circuit schema; raise a one-line ``ValueError`` naming the bad part."""
    if not isinstance(G, nx.DiGraph) or G.is_multigraph():
        raise ValueError(f"a circuit graph is a networkx DiGraph, got {type(G).__name__}")
    for key in REQUIRED_GRAPH_ATTRS:
        if key not in G.graph:
            raise ValueError(f"graph attribute {key!r} is missing (make graphs with graphs.circuit.new_circuit)")
    for key, value in G.graph.items():
        _check_scalar(value, f"graph attribute {key!r}")
    for n, d in G.nodes(data=True):
        parsed = parse_node_id(n)
        if d.get("kind") != parsed["kind"]:
            raise ValueError(f"node {n}: kind {d.get('kind')!r} does not match its id ({parsed['kind']!r})")
        for key, value in d.items():
            _check_scalar(value, f"node {n}: attribute {key!r}")
        for field in _INT_ATTRS:
            if field in parsed:
                if d.get(field) != parsed[field] or type(d.get(field)) is not int:
                    raise ValueError(f"node {n}: {field}={d.get(field)!r} does not match its id ({parsed[field]})")
            elif field in d:
                if not (field == "layer" and parsed["kind"] == "logits"):
                    raise ValueError(f"node {n}: a {parsed['kind']} node has no {field}")
                if type(d[field]) is not int:
                    raise ValueError(f"node {n}: {field} must be an int, got {d[field]!r}")
        if "score" in d and isinstance(d["score"], bool | str):
            raise ValueError(f"node {n}: score must be a number, got {d['score']!r}")
        if "in_circuit" in d and not isinstance(d["in_circuit"], bool):
            raise ValueError(f"node {n}: in_circuit must be a bool, got {d['in_circuit']!r}")
    logits_layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] == "logits" and "layer" in d]
    other_layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] != "logits"]
    if logits_layers and other_layers and min(logits_layers) <= max(other_layers):
        raise ValueError(f"node logits: layer {min(logits_layers)} must come after the last layer "
                         f"({max(other_layers)})")
    for u, v, d in G.edges(data=True):
        _validate_edge(G, u, v, d)
    _check_types(((f"node {n}", d) for n, d in G.nodes(data=True)))
    _check_types(((f"edge {u}->{v}", d) for u, v, d in G.edges(data=True)))


def _check_types(items: Iterator[tuple[str, dict[str, Any]]]) -> None:
    """One value type per attribute name (GraphML and GEXF declare a type per attribute)."""
    seen: dict[str, tuple[type, str]] = {}
    for where, d in items:
        for key, value in d.items():
            first = seen.setdefault(key, (type(value), where))
            if first[0] is not type(value):
                raise ValueError(f"{where}: attribute {key!r} is {type(value).__name__} but it is "
                                 f"{first[0].__name__} on {first[1]} (one type per attribute)")


def _validate_edge(G: nx.DiGraph, u: str, v: str, d: dict[str, Any]) -> None:
    name = f"edge {u}->{v}"
    for key, value in d.items():
        _check_scalar(value, f"{name}: attribute {key!r}")
    su, sv = G.nodes[u], G.nodes[v]
    if su["kind"] == "logits" or sv["kind"] in INPUT_KINDS:
        raise ValueError(f"{name}: logits sends nothing and {sv['kind']} receives nothing")
    both_features = su["kind"] in SITE_KINDS or sv["kind"] in SITE_KINDS
    same_layer_feature = both_features and su.get("layer") == sv.get("layer")
    if not same_layer_feature and _order_key(su) >= _order_key(sv):
        raise ValueError(f"{name}: the sender does not come before the receiver in the forward pass")
    for key in ("score", *(f"score_{x}" for x in QKV)):
        if key in d and isinstance(d[key], bool | str):
            raise ValueError(f"{name}: {key} must be a number, got {d[key]!r}")
    for key in ("in_circuit", *(f"in_circuit_{x}" for x in QKV)):
        if key in d and not isinstance(d[key], bool):
            raise ValueError(f"{name}: {key} must be a bool, got {d[key]!r}")
    if "in_circuit" not in d:
        raise ValueError(f"{name}: attribute 'in_circuit' is missing")
    if is_split(d):
        inputs = _split_inputs(sv["kind"])
        if not inputs:
            raise ValueError(f"{name}: q/k/v attributes on an edge into a {sv['kind']} (only attention heads"
                             f"{_other_split_kinds()})")
        for x in QKV:
            if x not in inputs and (f"score_{x}" in d or f"in_circuit_{x}" in d):
                raise ValueError(f"{name}: a {sv['kind']} has no {x} input")
            if f"score_{x}" in d and f"in_circuit_{x}" not in d:
                raise ValueError(f"{name}: score_{x} without in_circuit_{x}")
        expected = dict(d)
        _refresh_split_edge(expected)
        for key in ("input", "in_circuit", "score"):
            if expected.get(key) != d.get(key):
                raise ValueError(f"{name}: {key}={d.get(key)!r} disagrees with its per-input attributes "
                                 f"(expected {expected.get(key)!r})")
    elif d.get("input", "") != "":
        raise ValueError(f"{name}: input={d['input']!r} but the edge has no per-input (q/k/v) attributes")


# ---------------------------------------------------------------------------------------------- files

def to_node_link(G: nx.DiGraph) -> dict[str, Any]:
    """The graph as networkx node-link data (``edges`` key), readable by ``nx.node_link_graph``."""
    return {
        "directed": True,
        "multigraph": False,
        "graph": dict(G.graph),
        "nodes": [{"id": n, **d} for n, d in G.nodes(data=True)],
        "edges": [{"source": u, "target": v, **d} for u, v, d in G.edges(data=True)],
    }


def from_node_link(data: Any, where: str = "graph data") -> nx.DiGraph:
    """Inverse of :func:`to_node_link` (also reads networkx's older ``links`` key); validates the result."""
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError(f"{where} is not a circuit graph: expected node-link JSON with 'nodes' and 'edges'")
    if data.get("multigraph") or data.get("directed") is False:
        raise ValueError(f"{where} is not a circuit graph: it must be a directed, non-multi graph")
    edges = data.get("edges", data.get("links", []))
    G = nx.DiGraph()
    G.graph.update(data.get("graph") or {})
    try:
        for item in data["nodes"]:
            item = dict(item)
            G.add_node(item.pop("id"), **item)
        for item in edges:
            item = dict(item)
            G.add_edge(item.pop("source"), item.pop("target"), **item)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{where} is not a circuit graph: malformed node or edge entry ({e})") from None
    try:
        validate(G)
    except ValueError as e:
        raise ValueError(f"{where} is not a circuit graph: {e}") from None
    return G


def save(G: nx.DiGraph, path: str | Path) -> Path:
    """Validate and write ``G`` as networkx node-link JSON; returns the path written."""
    validate(G)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_node_link(G), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load(path: str | Path) -> nx.DiGraph:
    """Read a graph written by :func:`save`; raises ``FileNotFoundError`` / one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    return from_node_link(data, where=str(path))


# ------------------------------------------------------------------------------------------- drawing

def draw_column(d: dict[str, Any], last_layer: int) -> int:
    """Drawing column of a node: embed/pos_embed 0 (layer -1), layer L's attention 2L+1, its MLP,
    neurons, features and blocks 2L+2, logits 2*last_layer+3 (after the last layer)."""
    kind = d["kind"]
    if kind in INPUT_KINDS:
        return 0
    if kind == "logits":
        return 2 * last_layer + 3
    return 2 * d["layer"] + (1 if _stage(kind) == 0 else 2)


def positions(G: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """``{node: (column, row)}`` for left-to-right drawing: columns follow :func:`draw_column`,
    compressed to 0..C-1 (empty columns dropped); rows number the nodes of a column from 0, ordered by
    kind, head / index and id."""
    layers = [d["layer"] for _, d in G.nodes(data=True) if d["kind"] != "logits" and "layer" in d]
    last = max(layers, default=-1)
    raw = {n: draw_column(d, last) for n, d in G.nodes(data=True)}
    rank = {c: i for i, c in enumerate(sorted(set(raw.values())))}
    kind_order = {k: i for i, k in enumerate(KINDS)}
    by_col: dict[int, list[str]] = {}
    for n in G.nodes:
        by_col.setdefault(rank[raw[n]], []).append(n)
    out: dict[str, tuple[int, int]] = {}
    for col, nodes in by_col.items():
        nodes.sort(key=lambda n: (kind_order[G.nodes[n]["kind"]], G.nodes[n].get("head", -1),
                                  G.nodes[n].get("index", -1), n))
        for row, n in enumerate(nodes):
            out[n] = (col, row)
    return out
