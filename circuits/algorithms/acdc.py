"""ACDC: Automatic Circuit DisCovery (Conmy et al. 2023, "Towards Automated Circuit Discovery for
Mechanistic Interpretability", NeurIPS 2023), at edge level.

Algorithm (sequential ACDC). Start from the full graph H (no edge ablated) and its metric m(H) (KL
divergence of the next-token distribution from the clean model's, by default). Visit the receivers from
the output back to the inputs (:func:`circuits.algorithms.order.acdc_receivers`). For each receiver and
each of its incoming edges e in turn: ablate e on top of everything removed so far; if
``m(H - {e}) - m(H) < tau`` (for a task metric: ``|m(H - {e}) - m(H)| < tau``) e stays removed and
H := H - {e}, else e is restored. A receiver none of whose outgoing edges is still present no longer
reaches the output: its incoming edges are removed without evaluation, as the original implementation
does (ablating them cannot change the output, so sequential ACDC would remove them too for tau > 0).

Speed-up: speculative batching, with exactly sequential ACDC's result. Sequential ACDC is a sequence of
trials, each depending on the decisions before it. We *guess* the next decisions, simulate the run under
the guesses (including which receivers would be skipped as disconnected) and evaluate the resulting
chain of trial masks (trial j = everything removed so far + the earlier trials guessed "remove" + edge j)
in ONE batched engine call. Then walk the chain: the first decision is exact, and each following one is
exact as long as every earlier guess held, because its mask is then exactly the graph sequential ACDC
would test. At the first wrong guess the walk stops (that decision itself is exact, so every round makes
progress); the values measured past it (against a graph one decision away) become the guesses of the
next round. An edge never measured is guessed "remove" (most edges are). Hence every decision, skipped
receiver and effect size equals sequential ACDC's (up to float rounding between batched and single
forwards); ``window=1`` is plain sequential ACDC, one mask per call.

How far to speculate: a round of w trials costs ``call_overhead + w`` (in mask units) and yields
``U(w) = sum_{i<w} prod_{j<i} p_j`` exact decisions in expectation, where p_j is the running hit rate of
guesses of trial j's kind (informed by an earlier measurement, or not; Beta priors 0.95 and 0.7). Each
round uses the w <= ``window`` maximising ``U(w) / (call_overhead + w)`` (default overhead: 0.5 on a CPU,
20 on a GPU). The choice depends only on the
measured values, so a rerun repeats it exactly.

Resume: with ``config.checkpoint`` the state after a completed round (removed edges, measured effects,
position, counters) is written atomically every ``SAVE_EVERY`` seconds and when the run stops (also on
Ctrl-C); with ``config.resume`` a run continues from it and ends with the same circuit. The progress bar
(``config.progress``) counts candidate edges decided, with tqdm's rate and ETA.

Warm start (``config.warm_start`` N or ``warm_start_fraction``), for graphs too large to try every edge
(about 120k edges on a 30-layer model): score every edge once with EAP-IG (on ``config.warm_start_metric``,
the task's metric by default, since KL has no gradient at the clean run), keep the N edges of largest
``|score|`` as candidates and remove every other edge up front; ACDC then runs as above over the
candidates only (the others are never tried), starting from the metric of the graph of candidates. Cost:
one EAP-IG plus about N trials instead of E. Trade-off: an edge outside the top N can never be in the
circuit, and the candidates are judged against a graph that already lacks the others, so the result is
ACDC restricted to EAP-IG's top N, not ACDC on the whole graph; choose N well above the circuit size you
expect (the result's ``stat_warm_start_kept`` says how many candidates survived).

Scores and ranking: an edge's value is the metric change measured when ACDC tried it, against whatever had
been removed before (0 for edges into skipped receivers, NaN for edges removed up front by a warm start):
not a per-edge effect. The result therefore ranks by membership (``ranking_kind="in-circuit"``: kept edges
first by ``|change|``, then tried-and-removed ones, then untried ones); ROC curves as in Conmy et al. come
from a sweep of tau (:mod:`circuits.algorithms.acdc_sweep`), one ACDC run per tau.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuits.algorithms.base import DIVERGENCE_METRICS, DiscoveryConfig, DiscoveryResult, register
from circuits.algorithms.order import Receiver, acdc_receivers
from patching.kinds import unit_kind

log = logging.getLogger(__name__)

DEFAULT_TAU = 0.01
CPU_CALL_OVERHEAD = 0.5   # cost of an engine call in masks (measured on ioi-2l: ~18 ms per call, ~35 per mask)
GPU_CALL_OVERHEAD = 20.0
CHECKPOINT_VERSION = 4
BASE_MIN_MASKS = 3  # rounds of at least this many trials run relative to the current graph (EdgePatcher.based_on)
SAVE_EVERY = 2.0  # seconds between checkpoint writes (and one when the run stops, even by Ctrl-C)


@dataclass
class _State:
    """Mutable progress of one ACDC run (what a checkpoint holds)."""

    removed: torch.Tensor   # [E] bool
    effect: torch.Tensor    # [E] float64: metric change measured when the edge was tried
    tested: torch.Tensor    # [E] bool
    next_receiver: int
    next_edge: int          # position within the next receiver's incoming edges
    current: float          # metric of the current graph
    forward_passes: int
    ablations: int
    seconds: float
    rounds: int
    wrong_guesses: int
    skipped_receivers: int
    hits: list[int]         # right guesses [uninformed, informed] among decisions made
    tries: list[int]        # guesses [uninformed, informed] among decisions made


@register("acdc", levels=("edge",), default_metric="kl", selection="threshold", default_threshold=DEFAULT_TAU,
          warm_start=True)
def acdc(model: Any, graph: Any, batch: Any, config: DiscoveryConfig) -> DiscoveryResult:
    """ACDC (Conmy et al. 2023): greedy sequential edge removal with threshold tau, from the output back."""
    from circuits.algorithms.engine import patcher_options
    from patching.exact import EdgePatcher

    graph.require_edges("acdc")
    metric = config.metric or "kl"
    t0 = time.perf_counter()
    patcher = EdgePatcher(model, graph, batch, ablation=config.ablation, metric=metric,
                          per_position=config.per_position, chunk_size=config.chunk_size,
                          **patcher_options(EdgePatcher, config))
    removed0, warm_stats, warm_passes = initial_removed(model, graph, batch, config)
    fingerprint = _fingerprint(graph, batch, config, metric, removed0)
    kept, effect, stats, seconds = run_acdc(patcher, graph, config, fingerprint=fingerprint, t0=t0,
                                            removed=removed0)
    stats.update(warm_stats)
    stats["forward_passes"] += warm_passes
    if removed0 is not None:
        stats["warm_start_kept"] = int((kept & ~removed0).sum())
    return make_result(graph, config, metric, kept, effect, stats, seconds)


def initial_removed(model: Any, graph: Any, batch: Any, config: DiscoveryConfig
                    ) -> tuple[torch.Tensor | None, dict[str, float], int]:
    """The warm start's up-front removals (every edge outside EAP-IG's top N), stats and EAP-IG's passes;
    ``(None, {}, 0)`` without a warm start."""
    from circuits.algorithms.engine import top_edges, warm_start_scores

    n = config.warm_start_size(len(graph.edges))
    if n is None:
        return None, {}, 0
    scores = warm_start_scores(model, graph, batch, config)
    candidates = top_edges(scores.values, n)
    log.info("acdc: warm start keeps %d of %d edges as candidates (EAP-IG on %s)", n, len(graph.edges),
             scores.metric)
    return ~candidates, {"warm_start_candidates": n, "warm_start_seconds": float(scores.seconds)}, \
        int(scores.forward_passes)


def make_result(graph: Any, config: DiscoveryConfig, metric: str, kept: torch.Tensor, effect: torch.Tensor,
                stats: dict[str, float], seconds: float) -> DiscoveryResult:
    """The DiscoveryResult of one ACDC run, ranked by membership (module docstring)."""
    from patching.scores import Scores

    fp, ab = int(stats["forward_passes"]), int(stats["ablations"])
    scores = Scores(graph=graph, level="edge", values=effect.float(), ids=tuple(e.id for e in graph.edges),
                    method="acdc", ablation=config.ablation, metric=metric, forward_passes=fp, seconds=seconds)
    mag = effect.abs().nan_to_num(nan=0.0)
    unit = mag / (float(mag.max()) + 1.0)  # in [0, 1)
    tried = ~torch.isnan(effect) & (effect != 0)
    ranking = torch.where(kept, 2.0 + unit, torch.where(tried, 1.0 + unit, unit))
    return DiscoveryResult(scores=scores, kept=kept, level="edge", method="acdc", forward_passes=fp,
                           ablations=ab, seconds=seconds, stats=stats, ranking=ranking, ranking_kind="in-circuit")


def run_acdc(patcher: Any, graph: Any, config: DiscoveryConfig, *, fingerprint: str = "",
             t0: float | None = None, removed: torch.Tensor | None = None,
             guesses: dict[int, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], float]:
    """ACDC's loop over any patcher with ``run(masks [K, E]) -> [K, B]``, ``clean_metric``,
    ``ablated_metric``, ``forward_passes`` and ``ablations`` (the engine's EdgePatcher, or a test double).

    ``removed``: edges removed up front (a warm start), never tried. ``guesses``: initial speculation
    guesses (edge -> "remove"), e.g. from a run at a neighbouring tau; they change the cost, never the result.
    Returns ``(kept [E] bool, effect [E] float64, stats, seconds)``.
    """
    t0 = time.perf_counter() if t0 is None else t0
    tau = DEFAULT_TAU if config.threshold is None else float(config.threshold)
    use_abs = (config.metric or "kl") not in DIVERGENCE_METRICS
    receivers = acdc_receivers(graph)
    n_edges = len(graph.edges)
    outgoing: dict[str, list[int]] = {}
    for i, e in enumerate(graph.edges):
        outgoing.setdefault(e.sender, []).append(i)
    out_edges = {k: torch.tensor(v, dtype=torch.long) for k, v in outgoing.items()}
    kinds = {n.id: n.kind for n in graph.nodes}
    fingerprint = f"{fingerprint}|tau={tau!r}"
    pre = torch.zeros(n_edges, dtype=torch.bool) if removed is None else removed.detach().cpu().clone()

    def live(rec: Receiver, removed: torch.Tensor) -> bool:
        if unit_kind(kinds[rec.node]).is_sink:
            return True
        out = out_edges.get(rec.node)
        return out is not None and bool((~removed[out]).any())

    state = _load(config, fingerprint, n_edges) if config.resume else None
    if state is None:
        current = float(patcher.clean_metric.double().mean())
        if bool(pre.any()):
            current = float(patcher.run(pre[None].to(patcher_device(patcher))).double().mean())
        effect = torch.zeros(n_edges, dtype=torch.float64)
        effect[pre] = math.nan
        state = _State(removed=pre.clone(), effect=effect, tested=torch.zeros(n_edges, dtype=torch.bool),
                       next_receiver=0, next_edge=0, current=current, forward_passes=0, ablations=0,
                       seconds=0.0, rounds=0, wrong_guesses=0, skipped_receivers=0, hits=[0, 0], tries=[0, 0])
    else:
        log.info("acdc: resuming at receiver %d/%d from %s", state.next_receiver, len(receivers), config.checkpoint)
    fp0, ab0, sec0 = state.forward_passes, state.ablations, state.seconds
    device = patcher_device(patcher)
    overhead = config.call_overhead
    if overhead is None:
        overhead = CPU_CALL_OVERHEAD if device.type == "cpu" else GPU_CALL_OVERHEAD
    guess: dict[int, bool] = dict(guesses or {})  # edge -> guessed "remove", from the edge's last measurement
    candidates = ~pre
    done = sum(int(candidates[list(r.edges)].sum()) for r in receivers[: state.next_receiver])
    if state.next_receiver < len(receivers):
        done += int(candidates[list(receivers[state.next_receiver].edges[: state.next_edge])].sum())
    last_save, consistent = time.perf_counter(), True
    with tqdm(total=int(candidates.sum()), initial=done, desc="ACDC", unit="edge", disable=not config.progress,
              dynamic_ncols=True) as bar:
        try:
            while state.next_receiver < len(receivers):
                steps, masks = _plan(state, receivers, guess, config.window, overhead, live, pre)
                values: list[float] = []
                if masks:
                    # a round's trials differ from the current graph at the receivers visited: relative to it
                    # (one base forward), each trial re-runs only from its first changed receiver
                    based = len(masks) >= BASE_MIN_MASKS and hasattr(patcher, "based_on")
                    with patcher.based_on(state.removed.to(device)) if based else nullcontext():
                        values = patcher.run(torch.stack(masks).to(device)).double().mean(-1).cpu().tolist()
                    state.rounds += 1
                consistent = False
                bar.update(_walk(state, receivers, steps, values, guess, tau, use_abs, pre))
                state.forward_passes = fp0 + int(patcher.forward_passes)  # this process adds to a resumed run
                state.ablations = ab0 + int(patcher.ablations)
                state.seconds = sec0 + time.perf_counter() - t0
                consistent = True
                if config.checkpoint and time.perf_counter() - last_save >= SAVE_EVERY:
                    _save(config.checkpoint, fingerprint, state)
                    last_save = time.perf_counter()
                bar.set_postfix(kept=int((~state.removed).sum()), metric=f"{state.current:.4g}", refresh=False)
        finally:  # also on Ctrl-C: keep the state after the last completed round
            if config.checkpoint and consistent:
                _save(config.checkpoint, fingerprint, state)
    stats = {"tau": tau, "metric_clean": float(patcher.clean_metric.double().mean()),
             "metric_ablated": float(patcher.ablated_metric.double().mean()), "metric_final": state.current,
             "rounds": state.rounds, "wrong_guesses": state.wrong_guesses,
             "skipped_receivers": state.skipped_receivers, "receivers": len(receivers),
             "edges_tested": int(state.tested.sum()), "forward_passes": state.forward_passes,
             "ablations": state.ablations}
    log.info("acdc: kept %d/%d edges, %d forward passes, %d ablations, %.2fs", int((~state.removed).sum()),
             n_edges, state.forward_passes, state.ablations, state.seconds)
    return ~state.removed, state.effect, stats, state.seconds


# Beta priors of the guess hit rates: (hits, misses) for [uninformed, informed] guesses
_PRIOR = ((7.0, 3.0), (19.0, 1.0))


def _window(state: _State, informed: list[bool], overhead: float) -> int:
    """The number of planned trials to evaluate: argmax_w U(w) / (overhead + w) (module docstring)."""
    rate = [(state.hits[k] + _PRIOR[k][0]) / (state.tries[k] + sum(_PRIOR[k])) for k in (0, 1)]
    best, best_w, useful, reach = -1.0, 1, 0.0, 1.0
    for w, inf in enumerate(informed, start=1):
        useful += reach  # trial w-1 is exact if every earlier guess held
        reach *= rate[int(inf)]
        value = useful / (overhead + w)
        if value > best + 1e-12:
            best, best_w = value, w
    return best_w


def _plan(state: _State, receivers: list[Receiver], guess: dict[int, bool], window: int, overhead: float,
          live: Callable[[Receiver, torch.Tensor], bool], pre: torch.Tensor) -> tuple[list[tuple], list[torch.Tensor]]:
    """Simulate sequential ACDC from the current position under the guesses, up to ``window`` trials,
    and keep the most profitable prefix (:func:`_window`).

    Returns the steps (``("skip", r)``: receiver r found disconnected; ``("pre", r, p)``: the p-th incoming
    edge of receiver r was removed up front; ``("try", r, p, edge, guess, informed)``: try that edge) and one
    trial mask per ``try``.
    """
    chain = state.removed.clone()
    steps: list[tuple] = []
    masks: list[torch.Tensor] = []
    r, p = state.next_receiver, state.next_edge
    while r < len(receivers) and len(masks) < window:
        rec = receivers[r]
        if p == 0 and not live(rec, chain):
            steps.append(("skip", r))
            chain = chain.clone()  # the last trial mask may be this very tensor
            chain[list(rec.edges)] = True
            r += 1
            continue
        e = rec.edges[p]
        if pre[e]:
            steps.append(("pre", r, p))
            r, p = (r + 1, 0) if p + 1 == len(rec.edges) else (r, p + 1)
            continue
        g = guess.get(e, True)
        trial = chain.clone()
        trial[e] = True
        masks.append(trial)
        steps.append(("try", r, p, e, g, e in guess))
        if g:
            chain = trial
        r, p = (r + 1, 0) if p + 1 == len(rec.edges) else (r, p + 1)
    if len(masks) > 1:
        w = _window(state, [st[5] for st in steps if st[0] == "try"], overhead)
        cut = [i for i, st in enumerate(steps) if st[0] == "try"][w - 1]
        steps, masks = steps[: cut + 1], masks[:w]
    return steps, masks


def _walk(state: _State, receivers: list[Receiver], steps: list[tuple], values: list[float],
          guess: dict[int, bool], tau: float, use_abs: bool, pre: torch.Tensor) -> int:
    """Apply the planned steps while every earlier guess held; returns the number of candidate edges decided."""
    before = state.current  # metric of the simulated graph before the step
    exact = True
    decided = 0
    t = 0
    for step in steps:
        if step[0] == "skip":
            if exact:
                rec = receivers[step[1]]
                idx = list(rec.edges)
                decided += int((~state.removed[idx]).sum())
                state.removed[idx] = True
                state.skipped_receivers += 1
                state.next_receiver, state.next_edge = step[1] + 1, 0
            continue
        if step[0] == "pre":
            if exact:
                r, p = step[1], step[2]
                state.next_receiver, state.next_edge = (r + 1, 0) if p + 1 == len(receivers[r].edges) else (r, p + 1)
            continue
        _, r, p, e, g, informed = step
        value = values[t]
        t += 1
        change = value - before
        remove = (abs(change) if use_abs else change) < tau
        if exact:
            state.effect[e] = change
            state.tested[e] = True
            if remove:
                state.removed[e] = True
                state.current = value
            last = p + 1 == len(receivers[r].edges)
            state.next_receiver, state.next_edge = (r + 1, 0) if last else (r, p + 1)
            decided += 1
            state.tries[int(informed)] += 1
            state.hits[int(informed)] += int(remove == g)
            if remove != g:
                exact = False
                state.wrong_guesses += 1
        else:
            guess[e] = remove  # measured against a graph one decision away: the next round's guess
        if g:
            before = value
    return decided


def patcher_device(patcher: Any) -> torch.device:
    """Device the engine wants masks on (its cached activations' device, else CPU)."""
    dev = getattr(patcher, "device", None)
    if dev is not None:
        return torch.device(dev)
    clean = getattr(patcher, "clean_metric", None)
    return clean.device if isinstance(clean, torch.Tensor) else torch.device("cpu")


def _fingerprint(graph: Any, batch: Any, config: DiscoveryConfig, metric: str,
                 removed: torch.Tensor | None = None) -> str:
    h = hashlib.sha256()
    h.update("\n".join(e.id for e in graph.edges).encode())
    for t in (batch.clean, batch.corrupt, batch.answer, batch.wrong, batch.pos):
        h.update(t.detach().cpu().numpy().tobytes())
    h.update(json.dumps([config.ablation, metric, config.per_position]).encode())
    if removed is not None:
        h.update(removed.cpu().numpy().tobytes())
    return h.hexdigest()


def _save(path: str, fingerprint: str, state: _State) -> None:
    data = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "next_receiver": state.next_receiver,
            "next_edge": state.next_edge,
            "removed": [i for i, r in enumerate(state.removed.tolist()) if r],
            "tested": [i for i, r in enumerate(state.tested.tolist()) if r],
            "effect": state.effect.tolist(), "current": state.current, "forward_passes": state.forward_passes,
            "ablations": state.ablations, "seconds": state.seconds, "rounds": state.rounds,
            "wrong_guesses": state.wrong_guesses, "skipped_receivers": state.skipped_receivers,
            "hits": state.hits, "tries": state.tries}
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, p)


def _load(config: DiscoveryConfig, fingerprint: str, n_edges: int) -> _State | None:
    if not config.checkpoint or not Path(config.checkpoint).exists():
        return None
    try:
        data = json.loads(Path(config.checkpoint).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"acdc checkpoint {config.checkpoint}: unreadable ({e})") from e
    if data.get("version") != CHECKPOINT_VERSION or data.get("fingerprint") != fingerprint:
        raise ValueError(f"acdc checkpoint {config.checkpoint} was written for a different model, task, "
                         f"ablation, metric or tau; delete it or drop --resume")
    removed = torch.zeros(n_edges, dtype=torch.bool)
    removed[data["removed"]] = True
    tested = torch.zeros(n_edges, dtype=torch.bool)
    tested[data["tested"]] = True
    return _State(removed=removed, effect=torch.tensor(data["effect"], dtype=torch.float64), tested=tested,
                  next_receiver=int(data["next_receiver"]),
                  next_edge=int(data["next_edge"]), current=float(data["current"]),
                  forward_passes=int(data["forward_passes"]), ablations=int(data["ablations"]),
                  seconds=float(data["seconds"]), rounds=int(data["rounds"]),
                  wrong_guesses=int(data["wrong_guesses"]), skipped_receivers=int(data["skipped_receivers"]),
                  hits=[int(x) for x in data["hits"]], tries=[int(x) for x in data["tries"]])
