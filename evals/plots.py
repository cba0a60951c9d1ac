"""PNG plots of faithfulness curves and ROC curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.faithfulness import FaithfulnessResult
from evals.ground_truth import ROC


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


MARKERS = "os^Dvp*hX"
STYLES = ("-", "-.", "--", ":")


def _pct_label(p: float) -> str:
    return f"{p:g}%"


def plot_faithfulness(result: FaithfulnessResult, path: str | Path, *, title: str = "") -> Path:
    """Two panels over the circuit size (% of edges, log x axis): faithfulness ``f`` and KL(full || circuit).

    One line per method, the random baseline dashed with a +-1 std band over seeds; CPR / CMD in the legend.
    """
    plt = _pyplot()
    pct = list(result.config.percentages)
    fig, (ax_f, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for i, (name, c) in enumerate(result.curves.items()):
        # earlier methods are drawn thicker, so identical curves stay visible on top of each other
        style = dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], ms=max(7 - 1.2 * i, 3),
                     lw=max(3.2 - 0.6 * i, 1.2), ls=("-", "-.", ":")[i % 3], alpha=0.9)
        ax_f.plot(pct, c.faithfulness, label=f"{name} (CPR {c.cpr:.3f}, CMD {c.cmd:.3f})", **style)
        ax_kl.plot(pct, c.kl, label=name, **style)
    if result.random is not None:
        r = result.random
        n_seeds = result.config.random_seeds
        label = f"random, mean of {n_seeds} seeds (CPR {r.cpr:.3f}, CMD {r.cmd:.3f})"
        ax_f.plot(pct, r.faithfulness, ls="--", color="0.35", lw=1.6, label=label + ", +-1 std")
        if r.faithfulness_std:
            lo = [m - s for m, s in zip(r.faithfulness, r.faithfulness_std, strict=True)]
            hi = [m + s for m, s in zip(r.faithfulness, r.faithfulness_std, strict=True)]
            ax_f.fill_between(pct, lo, hi, color="0.6", alpha=0.25, lw=0)
        ax_kl.plot(pct, r.kl, ls="--", color="0.35", lw=1.6, label="random")
    ax_f.axhline(1.0, color="k", lw=0.8, ls=":")
    ax_f.axhline(0.0, color="k", lw=0.8, ls=":")
    for ax in (ax_f, ax_kl):
        ax.set_xscale("log")
        ax.set_xticks(pct)
        ax.set_xticklabels([_pct_label(p) for p in pct], rotation=45)
        ax.minorticks_off()
        how = "connected circuits" if result.config.circuits == "connected" else "literal top-k"
        ax.set_xlabel(f"circuit size (% of {result.n_edges} edges; {how} by each method's ranking)")
        ax.grid(True, alpha=0.3)
    ax_f.set_ylabel(f"faithfulness f  (metric: {result.metric})")
    ax_f.set_title("faithfulness: (m(circuit) - m(empty)) / (m(full) - m(empty))", fontsize=10)
    ax_f.legend(fontsize=8, loc="best")
    ax_kl.set_ylabel("KL(full model || circuit), nats")
    ax_kl.set_title(f"KL divergence to the full model (empty circuit: {result.kl_empty:.3g})", fontsize=10)
    ax_kl.legend(fontsize=8, loc="best")
    return _save(plt, fig, path, title)


def plot_rocs(rocs: dict[str, dict[str, ROC]], path: str | Path, *, title: str = "") -> Path:
    """ROC curves against one reference circuit: one panel per level (edge: edge-level methods; node: all
    methods), AUC in the legend, the chance diagonal dashed. ``rocs[method][level]``."""
    plt = _pyplot()
    levels = [lvl for lvl in ("edge", "node") if any(lvl in d for d in rocs.values())]
    fig, axes = plt.subplots(1, max(len(levels), 1), figsize=(5.4 * max(len(levels), 1), 5.4),
                             constrained_layout=True, squeeze=False)
    for ax, level in zip(axes[0], levels, strict=False):
        some = None
        for i, (name, d) in enumerate(rocs.items()):
            if level not in d:
                continue
            some = roc = d[level]
            ax.plot(roc.fpr, roc.tpr, color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)],
                    ms=max(7 - 1.2 * i, 3), lw=max(3.2 - 0.6 * i, 1.2), ls=STYLES[i % len(STYLES)], alpha=0.9,
                    label=f"{name} (AUC {roc.auc:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="chance (AUC 0.5)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel(f"false positive rate ({level}s outside the reference)")
        ax.set_ylabel(f"true positive rate (reference {level}s found)")
        counts = f"\n{some.n_pos} {level}s in the reference, {some.n_neg} outside" if some else ""
        ax.set_title(f"{level}-level ROC over each method's ranking (ACDC: one point per tau){counts}",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path, title)


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    """Title, write (creating the folder) and close a figure."""
    if title:
        fig.suptitle(title, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
