"""A small hand-built circuit graph for tests, docs and viewer demos (no model involved).

:func:`induction_graph` builds the complete edge graph of a 2-layer, 4-head transformer with MLPs
(every sender -> every later receiver, q/k/v inputs for attention heads) and plants a textbook
induction circuit in it: the previous-token head ``a0.h1`` reads the positional embedding (its q and
k) and the token embedding (its v); the induction head ``a1.h2`` keys on ``a0.h1`` (k), queries and
copies the token embedding (q, v) and writes to the logits. Planted inputs get large negative scores
(ablating them lowers the metric) and are marked in circuit; every other input gets a small seeded
score and is left out, except one dangling in-circuit edge ``a0.h3 -> m0`` that reaches no logit,
for the ``keep_connected`` logic of :func:`graphs.ops.prune`.
"""

from __future__ import annotations

import random

import networkx as nx

from graphs.circuit import add_component, add_connection, new_circuit

PLANTED: dict[str, float] = {
    "pos_embed->a0.h1<q>": -0.8,
    "pos_embed->a0.h1<k>": -1.1,
    "embed->a0.h1<v>": -0.9,
    "a0.h1->a1.h2<k>": -2.5,
    "embed->a1.h2<q>": -1.4,
    "embed->a1.h2<v>": -1.9,
    "a1.h2->logits": -3.0,
    "embed->logits": 0.6,
    "a0.h3->m0": -0.7,  # dangling: m0 reaches the logits only through edges outside the circuit
}


def induction_graph(n_layers: int = 2, n_heads: int = 4, seed: int = 0) -> nx.DiGraph:
    """The complete edge graph described in the module docstring (``n_layers >= 2``, ``n_heads >= 4``)."""
    if n_layers < 2 or n_heads < 4:
        raise ValueError(f"induction_graph needs n_layers >= 2 and n_heads >= 4, got {n_layers}, {n_heads}")
    rng = random.Random(seed)
    G = new_circuit(model=f"attn-{n_layers}l{n_heads}h", task="induction", method="hand", ablation="resample",
                    metric="logit_diff", seed=seed, level="edge", faithfulness=0.93, forward_passes=0,
                    seconds=0.0)
    add_component(G, "embed", kind="embed", layer=-1, hook="hook_embed")
    add_component(G, "pos_embed", kind="pos_embed", layer=-1, hook="hook_pos_embed")
    senders = ["embed", "pos_embed"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for h, node in enumerate(heads):
            add_component(G, node, kind="attn_head", layer=layer, head=h,
                          hook=f"blocks.{layer}.attn.hook_result")
            for s in senders:
                for x in "qkv":
                    add_connection(G, s, node, input=x, score=round(rng.uniform(-0.2, 0.2), 4), in_circuit=False)
        mlp = f"m{layer}"
        add_component(G, mlp, kind="mlp", layer=layer, hook=f"blocks.{layer}.hook_mlp_out")
        for s in [*senders, *heads]:
            add_connection(G, s, mlp, score=round(rng.uniform(-0.2, 0.2), 4), in_circuit=False)
        senders += [*heads, mlp]
    add_component(G, "logits", kind="logits", layer=n_layers, hook=f"blocks.{n_layers - 1}.hook_resid_post")
    for s in senders:
        add_connection(G, s, "logits", score=round(rng.uniform(-0.2, 0.2), 4), in_circuit=False)
    for eid, score in PLANTED.items():
        sender, rest = eid.split("->")
        receiver, _, x = rest.partition("<")
        add_connection(G, sender, receiver, input=x.rstrip(">") or None, score=score, in_circuit=True)
    touched = {n for u, v, d in G.edges(data=True) if d["in_circuit"] for n in (u, v)}
    for n in G.nodes:
        G.nodes[n]["in_circuit"] = n in touched
        if G.nodes[n]["kind"] not in ("embed", "pos_embed", "logits"):
            G.nodes[n]["score"] = min((d["score"] for _, _, d in G.out_edges(n, data=True)), default=0.0)
    return G
