"""Reference circuits and tasks of tracr-compiled models (see :mod:`evals.tracr_models`).

Reference circuit (exact by construction). tracr gives every residual dimension a label, and each compiled
component reads and writes fixed labelled subspaces. From the compiled weights:

* ``writes(S)``: the dims a sender writes: nonzero rows of ``W_E`` columns (``embed``), of ``W_pos``
  (``pos_embed``), nonzero output columns of a head's ``W_O`` or an MLP's ``W_out``;
* ``reads(R, x)``: the dims a receiver reads through input ``x``: nonzero rows of a head's ``W_Q`` / ``W_K``
  / ``W_V`` (``x`` = q / k / v), of an MLP's ``W_in``, of ``W_U`` (``logits``).

An edge ``S -> R<x>`` of the engine's graph is in the *program circuit* when ``S`` writes, and ``R`` reads
through ``x``, a dim that carries input-dependent information: the constant dims ``one`` (tracr's bias
direction), ``tokens:BOS`` (BOS is always at position 0) and ``tokens:compiler_pad`` are left out. Edges not
on a path from ``embed`` / ``pos_embed`` to ``logits`` are dropped.

Given a task batch, :func:`tracr_reference` further keeps only the dims whose value differs between the
clean and the corrupted run at the sender's output (measured, tolerance 1e-6): the *task circuit*, the
edges through which the clean/corrupt difference can flow. For ``reverse`` on same-length prompts the length
computation is identical in both runs, so its task circuit is ``embed -> reverse head <v> -> logits``; its
program circuit also holds the length / opp_idx path.

Tasks (:func:`tracr_task`): all prompts have the program's ``max_seq_len`` tokens (the models attend in both
directions, so right padding would change ``length``). ``reverse``: the last output is the first token;
the corrupted prompt changes the first token; metric ``logit_diff`` (clean 1, corrupted -1).
``frac_prevs``: the last output is the fraction of ``x`` tokens; the corrupted prompt turns at least one
``x`` into ``y``; ``logit_diff`` of the readout token against ``compiler_pad`` (always 0) is that fraction.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from circuits.tasks.base import PromptPair, Task
from evals.references import ReferenceCircuit
from evals.tracr_models import BOS, PAD, CompiledTracr, get_program, readout_token

CONSTANT_DIMS = ("one", f"tokens:{BOS}", f"tokens:{PAD}")
WEIGHT_TOL = 1e-9
DIFF_TOL = 1e-6


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


def tracr_reference(model: Any, graph: Any | None = None, *, batch: Any | None = None) -> ReferenceCircuit:
    """The program circuit of a tracr bridge, or with ``batch`` its task circuit (module docstring).

    With ``graph`` (a ComponentGraph) only the graph's edges are candidates and the result is checked
    against it; without, every sender/receiver pair in layer order is a candidate.
    """
    compiled: CompiledTracr | None = getattr(model, "tracr", None)
    if compiled is None:
        raise ValueError("tracr_reference: the model is not a tracr bridge (build it with evals.tracr_models)")
    labels = compiled.residual_labels
    constant = {i for i, lab in enumerate(labels) if lab in CONSTANT_DIMS}
    writes, reads = component_io(model)
    carried = {s: d - constant for s, d in writes.items()}
    if batch is not None:
        vary = varying_dims(model, batch.clean, batch.corrupt)
        carried = {s: d & vary.get(s, set()) for s, d in carried.items()}
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
    kind = "task circuit (clean/corrupt difference)" if batch is not None else "program circuit"
    details: dict[str, Any] = {"program": compiled.program.name, "kind": kind}
    details.update({f"via {e}": via[e] for e in kept})
    ref = ReferenceCircuit.from_edges(kept, source=f"tracr {compiled.program.name}: {kind} from compiled weights",
                                      details=details)
    if graph is not None:
        ref.check(graph)
    return ref


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
    length = program.max_seq_len
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


__all__ = ["component_io", "varying_dims", "tracr_reference", "component_roles", "tracr_task", "expected_metric",
           "readout_token"]
