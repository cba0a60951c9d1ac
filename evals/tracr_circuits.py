"""Reference circuits, tasks and the all-positions metric of tracr-compiled models (see :mod:`evals.tracr_models`),
following the protocol of Conmy et al. 2023 (ACDC) for ``reverse`` and ``frac_prevs`` (their "proportion").

Reference circuits. tracr gives every residual dimension a label, and each compiled component reads and
writes fixed labelled subspaces. From the compiled weights:

* ``writes(S)``: the dims a sender writes: nonzero rows of ``W_E`` columns (``embed``), of ``W_pos``
  (``pos_embed``), nonzero output columns of a head's ``W_O`` or an MLP's ``W_out``;
* ``reads(R, x)``: the dims a receiver reads through input ``x``: nonzero rows of a head's ``W_Q`` / ``W_K``
  / ``W_V`` (``x`` = q / k / v), of an MLP's ``W_in``, of ``W_U`` (``logits``).

The reference follows the ablation, because each ablation asks a different question:

* **program circuit** (zero ablation, Conmy et al.'s protocol): an edge ``S -> R<x>`` is a candidate when
  ``S`` writes a dim that ``R`` reads through ``x``, the constant dims included (``one``, tracr's bias
  direction, and ``tokens:BOS``: zero ablation removes them too); candidates off every path from the
  embeddings to the logits are dropped; then every candidate whose zero ablation alone leaves every output
  logit unchanged (``<= 1e-6``) on *every* input of the task's length is dropped. The last step uses
  :func:`edge_forward`, a forward pass over tracr's weights written here independently of the engine. It
  removes what the weights alone cannot tell: for ``reverse`` the selector-width head's query and key (its
  pattern is uniform with or without them) and the flip head's BOS fallback (``one`` x ``tokens:BOS``),
  which a sharp match always outweighs. The results equal the edge sets Conmy et al. publish as ground
  truth (:data:`CONMY_EDGES`; tested).
* **task circuit** (resample / mean ablation): only the dims whose value differs between the clean and the
  corrupted run at the sender's output (measured, tolerance 1e-6) count, without constants: the edges
  through which the clean/corrupt difference can flow. For ``reverse`` on same-length prompts the length
  computation is identical in both runs, so its task circuit is ``embed -> reverse head <v> -> logits``.

Tasks (:func:`tracr_task`): all prompts of a task have one length, :data:`TASK_LENGTH` (the models attend in
both directions, so right padding would change ``length``): 3 tokens for ``reverse``, as Conmy et al. (at
the longest input, 5, tracr's selector-width MLP saturates, and zero-ablating the length computation leaves
every output unchanged, so no method could find that part of the program circuit there), 5 for
``frac_prevs``. ``reverse``: the last output is the first token;
the corrupted prompt changes the first token; metric ``logit_diff`` (clean 1, corrupted -1).
``frac_prevs``: the last output is the fraction of ``x`` tokens; the corrupted prompt turns at least one
``x`` into ``y``; ``logit_diff`` of the readout token against ``compiler_pad`` (always 0) is that fraction.

All output positions (:func:`tracr_batch`, ``positions="all"``): Conmy et al. score tracr over every output
position, not the last one. The batch then has one row per (prompt, position 1..n), the metric reading that
row's position: ``reverse`` contrasts the program's output there (the token at the mirrored position) with
the corrupted prompt's output, or when they agree with the next vocabulary token; ``frac_prevs`` reads the
fraction up to that position. The mean over rows is the mean over prompts and positions. The distance
metric ``l2`` (:class:`L2ToClean`, registered in :data:`patching.metrics.METRICS` when this module is
imported) is Conmy et al.'s tracr metric: the squared distance of the output logits to the clean run's,
summed over the vocabulary (only the program's output columns are ever nonzero), per row.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from circuits.tasks.base import PromptPair, Task
from evals.references import ReferenceCircuit
from evals.tracr_models import BOS, PAD, CompiledTracr, bridge_vocab, get_program, readout_token, unembedding

CONSTANT_DIMS = ("one", f"tokens:{BOS}", f"tokens:{PAD}")
WEIGHT_TOL = 1e-9
DIFF_TOL = 1e-6
REFERENCE_KINDS = ("auto", "program", "task")
TASK_LENGTH = {"reverse": 3, "frac_prevs": 5}

# Conmy et al. 2023's ground truth for tracr (ACDC repository, acdc/tracr_task/utils.py,
# get_tracr_reverse_edges / get_tracr_proportion_edges: "ACDC run with threshold epsilon, metric l2 and zero
# ablation"), translated by hand into this project's edge ids. Their hook-level edges inside a head
# (hook_result -> hook_q -> hook_q_input) are one edge here; their compilations have the same layer layout
# (reverse: a0 length attention, m0 length, m1 opp_idx, m2 opp_idx-1, a3 flip; proportion: m0
# numerical(tokens == "x"), a1 mean).
CONMY_EDGES: dict[str, tuple[str, ...]] = {
    "reverse": ("a3.h0->logits", "m2->a3.h0<q>", "pos_embed->a3.h0<k>", "embed->a3.h0<v>", "m1->m2",
                "m0->m1", "embed->m1", "pos_embed->m1", "a0.h0->m0", "embed->m0", "embed->a0.h0<v>"),
    "frac_prevs": ("a1.h0->logits", "embed->a1.h0<q>", "pos_embed->a1.h0<q>", "embed->a1.h0<k>",
                   "pos_embed->a1.h0<k>", "m0->a1.h0<v>", "embed->m0"),
}


class L2ToClean:
    """Conmy et al.'s tracr metric: ``sum_v (logits - clean_logits)^2`` per row (0 on the clean run; lower is
    closer). Needs the clean logits ``[B, V]`` at each row's position, as ``KLToClean``."""

    __name__ = "l2"

    def __init__(self, clean_logits: torch.Tensor):
        self.clean = clean_logits.detach()

    def __call__(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        return ((logits - self.clean.to(logits.dtype)) ** 2).sum(-1)


def register_l2() -> None:
    """Add ``l2`` to the engine's metric registry (idempotent) so that every method can score with it."""
    from patching.metrics import HIGHER_IS_BETTER, METRICS

    if "l2" not in METRICS:
        def factory(clean_logits: torch.Tensor | None = None) -> L2ToClean:
            if clean_logits is None:
                raise ValueError("metric 'l2' needs the clean logits at the prediction position")
            return L2ToClean(clean_logits)

        METRICS["l2"] = factory
    HIGHER_IS_BETTER.setdefault("l2", False)


register_l2()


def reference_kind(ablation: str, kind: str = "auto") -> str:
    """``program`` or ``task``: ``auto`` follows the ablation (zero -> program, resample / mean -> task)."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; choose one of {REFERENCE_KINDS}")
    if kind != "auto":
        return kind
    return "program" if ablation == "zero" else "task"


def _order(node: str) -> float:
    if node in ("embed", "pos_embed"):
        return -1.0
    if node == "logits":
        return float("inf")
    layer = int(node[1:].split(".")[0])
    return 2.0 * layer + (1.0 if node.startswith("m") else 0.0)


def _nonzero_rows(w: torch.Tensor) -> set[int]:
    """Indices ``i`` with ``w[i, ...]`` not all (near) zero."""
    return set((w.detach().abs().reshape(w.shape[0], -1) > WEIGHT_TOL).any(-1).nonzero().flatten().tolist())


def component_io(model: Any) -> tuple[dict[str, set[int]], dict[tuple[str, str], set[int]]]:
    """``(writes, reads)``: the residual dims each sender writes and each ``(receiver, input)`` reads.

    Inputs are ``q``/``k``/``v`` for heads and ``""`` for MLPs and ``logits``.
    """
    cfg = model.cfg
    writes: dict[str, set[int]] = {"embed": _nonzero_rows(model.W_E.T), "pos_embed": _nonzero_rows(model.W_pos.T)}
    reads: dict[tuple[str, str], set[int]] = {("logits", ""): _nonzero_rows(model.W_U)}
    for layer in range(cfg.n_layers):
        blk = model.blocks[layer]
        for h in range(cfg.n_heads):
            hid = f"a{layer}.h{h}"
            writes[hid] = _nonzero_rows(blk.attn.W_O[h].T)
            for x, w in (("q", blk.attn.W_Q[h]), ("k", blk.attn.W_K[h]), ("v", blk.attn.W_V[h])):
                reads[(hid, x)] = _nonzero_rows(w)
        if not getattr(cfg, "attn_only", False):
            writes[f"m{layer}"] = _nonzero_rows(blk.mlp.W_out.T)
            reads[(f"m{layer}", "")] = _nonzero_rows(blk.mlp.W_in)
    return writes, reads


def varying_dims(model: Any, clean: torch.Tensor, corrupt: torch.Tensor) -> dict[str, set[int]]:
    """Per sender, the residual dims whose output differs (``> 1e-6`` anywhere) between the two runs."""
    cfg = model.cfg

    def outputs(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        out = {"embed": cache["hook_embed"], "pos_embed": cache["hook_pos_embed"].expand_as(cache["hook_embed"])}
        for layer in range(cfg.n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"]  # [B, P, H, d_head]
            per_head = torch.einsum("bphd,hdm->bphm", z, model.blocks[layer].attn.W_O)
            for h in range(cfg.n_heads):
                out[f"a{layer}.h{h}"] = per_head[:, :, h]
            if not getattr(cfg, "attn_only", False):
                out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
        return out

    a, b = outputs(clean), outputs(corrupt)
    return {k: set(((a[k] - b[k]).abs().amax(dim=(0, 1)) > DIFF_TOL).nonzero().flatten().tolist()) for k in a}


def _edge_id(sender: str, receiver: str, inp: str) -> str:
    return f"{sender}->{receiver}<{inp}>" if inp else f"{sender}->{receiver}"


def _on_paths(edges: dict[str, tuple[str, str]]) -> list[str]:
    """The edges lying on a path from embed / pos_embed to logits."""
    fwd, bwd = {"embed", "pos_embed"}, {"logits"}
    changed = True
    while changed:
        changed = False
        for s, r in edges.values():
            if s in fwd and r not in fwd:
                fwd.add(r)
                changed = True
            if r in bwd and s not in bwd:
                bwd.add(s)
                changed = True
    return [e for e, (s, r) in edges.items() if s in fwd and r in bwd]


def tracr_reference(model: Any, graph: Any | None = None, *, batch: Any | None = None,
                    kind: str | None = None) -> ReferenceCircuit:
    """The program circuit (``kind="program"``) or the task circuit (``"task"``, needs ``batch``) of a tracr
    bridge (module docstring). ``kind=None``: the task circuit when a batch is given, else the program circuit.

    With ``graph`` (a ComponentGraph) only the graph's edges are candidates and the result is checked
    against it; without, every sender/receiver pair in layer order is a candidate.
    """
    compiled: CompiledTracr | None = getattr(model, "tracr", None)
    if compiled is None:
        raise ValueError("tracr_reference: the model is not a tracr bridge (build it with evals.tracr_models)")
    kind = kind or ("task" if batch is not None else "program")
    if kind not in ("program", "task"):
        raise ValueError(f"tracr_reference: kind must be 'program' or 'task', got {kind!r}")
    if kind == "task" and batch is None:
        raise ValueError("tracr_reference: the task circuit needs the task's batch (its clean/corrupt difference)")
    labels = compiled.residual_labels
    writes, reads = component_io(model)
    if kind == "task":
        constant = {i for i, lab in enumerate(labels) if lab in CONSTANT_DIMS}
        vary = varying_dims(model, batch.clean, batch.corrupt)
        carried = {s: (d - constant) & vary.get(s, set()) for s, d in writes.items()}
    else:
        carried = dict(writes)
    if graph is not None:
        candidates = [(e.sender, e.receiver, e.input or "") for e in graph.edges]
    else:
        candidates = [(s, r, x) for s in writes for (r, x) in reads if _order(s) < _order(r)]
    edges: dict[str, tuple[str, str]] = {}
    via: dict[str, str] = {}
    for s, r, x in candidates:
        dims = carried.get(s, set()) & reads.get((r, x), set())
        if dims:
            eid = _edge_id(s, r, x)
            edges[eid] = (s, r)
            via[eid] = " ".join(labels[i] for i in sorted(dims))
    kept = _on_paths(edges)
    details: dict[str, Any] = {"program": compiled.program.name, "kind": kind}
    if kind == "program":
        inert = inert_edges(compiled, kept)
        details["dropped_inert"] = " ".join(sorted(inert))
        kept = _on_paths({e: edges[e] for e in kept if e not in inert})
        what = "program circuit (zero ablation) from compiled weights"
    else:
        what = "task circuit (clean/corrupt difference) from compiled weights"
    details.update({f"via {e}": via[e] for e in kept})
    ref = ReferenceCircuit.from_edges(kept, source=f"tracr {compiled.program.name}: {what}", details=details)
    if graph is not None:
        ref.check(graph)
    return ref


def _parse(edge_id: str) -> tuple[str, str, str]:
    sender, rest = edge_id.split("->", 1)
    receiver, _, inp = rest.partition("<")
    return sender, receiver, inp.rstrip(">")


def edge_forward(compiled: CompiledTracr, tokens: torch.Tensor, ablated: frozenset[str] | set[str] = frozenset()
                 ) -> torch.Tensor:
    """Logits ``[B, P, V]`` of the compiled program with the edges ``ablated`` zero-ablated.

    Written from tracr's weights alone (independent of the engine and of TransformerLens): every sender's
    output is kept separately; a receiver's input (a head's q / k / v, an MLP's input, the unembedding) is the
    sum of its senders' outputs, without the ablated edges'. Attention is bidirectional with scores scaled by
    ``1 / sqrt(d_head)``; MLPs are ``relu(x W1 + b1) W2 + b2``; attention output biases are added to the
    residual and carried by no edge.
    """
    w = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in compiled.weights.items()}
    B, P = tokens.shape
    emb = torch.zeros(len(bridge_vocab(compiled)), compiled.d_model, dtype=torch.float64)
    emb[: w["token_embed"].shape[0]] = w["token_embed"]
    out: dict[str, torch.Tensor] = {"embed": emb[tokens.cpu()], "pos_embed": w["pos_embed"][:P].expand(B, P, -1)}
    bias = torch.zeros(B, P, compiled.d_model, dtype=torch.float64)
    dh = compiled.d_head

    def read(receiver: str, inp: str = "") -> torch.Tensor:
        x = bias.clone()
        for s, o in out.items():
            if _edge_id(s, receiver, inp) not in ablated:
                x = x + o
        return x

    for layer in range(compiled.n_layers):
        heads = {}
        for h in range(compiled.n_heads):
            hid = f"a{layer}.h{h}"
            cols = slice(h * dh, (h + 1) * dh)
            q, k, v = (read(hid, x) @ w[f"{layer}.{part}"][:, cols] + w[f"{layer}.{part}.b"][cols]
                       for x, part in (("q", "query"), ("k", "key"), ("v", "value")))
            pattern = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, dim=-1)
            heads[hid] = (pattern @ v) @ w[f"{layer}.linear"][cols]
        out.update(heads)
        bias = bias + w[f"{layer}.linear.b"]
        mid = f"m{layer}"
        hidden = torch.relu(read(mid) @ w[f"{layer}.linear_1"] + w[f"{layer}.linear_1.b"])
        out[mid] = hidden @ w[f"{layer}.linear_2"] + w[f"{layer}.linear_2.b"]
    return read("logits") @ torch.from_numpy(unembedding(compiled)).double()


def inert_edges(compiled: CompiledTracr, edges: list[str], *, tol: float = DIFF_TOL) -> set[str]:
    """The ``edges`` whose zero ablation alone changes no output logit (BOS position excluded) by more than
    ``tol`` on any input of the program's domain (every sequence over its vocabulary of length 1 to
    ``max_seq_len``, after BOS), by :func:`edge_forward`."""
    from evals.tracr_models import all_inputs

    program = compiled.program
    vocab = {t: i for i, t in enumerate(bridge_vocab(compiled))}
    batches = [torch.tensor([[vocab[BOS]] + [vocab[t] for t in seq] for seq in all_inputs(program, range(n, n + 1))])
               for n in range(1, program.max_seq_len + 1)]
    clean = [edge_forward(compiled, t)[:, 1:] for t in batches]

    def moves(e: str) -> bool:
        return any(float((edge_forward(compiled, t, {e})[:, 1:] - c).abs().max()) > tol
                   for t, c in zip(batches, clean, strict=True))

    return {e for e in edges if not moves(e)}


def component_roles(model: Any) -> dict[str, str]:
    """For reports: the RASP SOps each component writes (label prefixes of its written dims)."""
    compiled: CompiledTracr = model.tracr
    writes, _ = component_io(model)
    roles = {}
    for s, dims in writes.items():
        names = sorted({compiled.residual_labels[i].split(":")[0] for i in dims})
        if names:
            roles[s] = ",".join(names)
    return roles


def tracr_task(name: str, n: int = 32, seed: int = 0) -> Task:
    """Clean / corrupted prompt pairs for the tracr program ``name`` (module docstring)."""
    program = get_program(name)
    rng = random.Random(seed)
    vocab = sorted(program.vocab)
    length = TASK_LENGTH[program.name]
    pairs = []
    if program.name == "reverse":
        for _ in range(n):
            clean = [rng.choice(vocab) for _ in range(length)]
            first = rng.choice([v for v in vocab if v != clean[0]])
            corrupt = [first] + clean[1:]
            pairs.append(PromptPair(" ".join(clean), " ".join(corrupt), answer=clean[0], wrong=first))
    elif program.name == "frac_prevs":
        readout = program.name
        for _ in range(n):
            clean = [rng.choice(vocab) for _ in range(length)]
            if "x" not in clean:
                clean[rng.randrange(length)] = "x"
            xs = [i for i, t in enumerate(clean) if t == "x"]
            flip = set(rng.sample(xs, rng.randint(1, len(xs))))
            corrupt = ["y" if i in flip else t for i, t in enumerate(clean)]
            pairs.append(PromptPair(" ".join(clean), " ".join(corrupt), answer=readout, wrong=PAD))
    else:  # pragma: no cover - registry and tasks are kept in step
        raise ValueError(f"tracr program {name!r} has no task")
    return Task(name=f"tracr-{program.name}", pairs=tuple(pairs), metric="logit_diff",
                source=f"generator:tracr-{program.name} seed={seed} n={n}")


def expected_metric(name: str, task: Task) -> torch.Tensor:
    """The clean metric each pair should give, from the program's semantics (an oracle for tests)."""
    program = get_program(name)
    if program.name == "reverse":
        return torch.ones(len(task))
    return torch.tensor([p.clean.split().count("x") / len(p.clean.split()) for p in task.pairs])


def program_outputs(name: str, tokens: list[str]) -> list[str | float]:
    """The program's output at every position after BOS, from its semantics (an oracle independent of tracr)."""
    program = get_program(name)
    if program.name == "reverse":
        return list(reversed(tokens))
    return [tokens[: i + 1].count("x") / (i + 1) for i in range(len(tokens))]


POSITIONS = ("all", "last")


def tracr_batch(task: Task, model: Any, positions: str = "all", device: Any = None) -> Any:
    """The TaskBatch of a tracr task: ``last`` is ``task.batch`` (the last position only); ``all`` has one row
    per (prompt, output position 1..n), prompt-major, reading the program's output there (module docstring).
    """
    from patching.batch import TaskBatch

    if positions not in POSITIONS:
        raise ValueError(f"tracr positions: choose one of {POSITIONS}, got {positions!r}")
    base = task.batch(model.tokenizer, device="cpu")
    if positions == "last":
        return base if device is None else base.to(device)
    program = get_program(task.name)
    vocab = {t: i for i, t in enumerate(bridge_vocab(model.tracr))}
    out_tokens = sorted(program.vocab)
    rows: list[tuple[int, int, int, int]] = []  # (pair, position, answer, wrong)
    for i, pair in enumerate(task.pairs):
        clean, corrupt = pair.clean.split(), pair.corrupt.split()
        if len(clean) != int(base.pos[i]):
            raise ValueError(f"{task.where(i)}: tracr prompts must not be padded (all of one length)")
        if program.name == "reverse":
            mine, theirs = program_outputs(task.name, clean), program_outputs(task.name, corrupt)
            for p, (a, b) in enumerate(zip(mine, theirs, strict=True), start=1):
                wrong = b if b != a else out_tokens[(out_tokens.index(a) + 1) % len(out_tokens)]
                rows.append((i, p, vocab[a], vocab[wrong]))
        else:
            rows += [(i, p, vocab[readout_token(model.tracr)], vocab[PAD]) for p in range(1, len(clean) + 1)]
    idx = torch.tensor([r[0] for r in rows])
    batch = TaskBatch(base.clean[idx], base.corrupt[idx], torch.tensor([r[2] for r in rows]),
                      torch.tensor([r[3] for r in rows]), torch.tensor([r[1] for r in rows]))
    return batch if device is None else batch.to(device)


__all__ = ["component_io", "varying_dims", "tracr_reference", "component_roles", "tracr_task", "expected_metric",
           "readout_token", "edge_forward", "inert_edges", "tracr_batch", "program_outputs", "reference_kind",
           "CONMY_EDGES", "L2ToClean", "register_l2", "REFERENCE_KINDS", "POSITIONS", "TASK_LENGTH"]
