"""Outputs of the level comparison (:mod:`evals.levels`): ``results.json``, ``results.md``, ``levels.png``.

The plot has one curve per level (faithfulness against units kept, log x axis: the levels differ by orders of
magnitude in their number of units), each level's random baseline dashed in the same colour, and the feature
level's error-node figures in the legend; the warning line of :func:`evals.levels.error_warning` goes into the
markdown (and the CLI's output) whenever it applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evals.levels import LevelsReport, atomic_write

TARGETS = (0.5, 0.8, 0.9)
COLOURS = {"feature": "C4", "neuron": "C0", "node": "C1"}
MARKERS = {"feature": "o", "neuron": "s", "node": "^"}


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def rows(report: LevelsReport) -> list[dict[str, Any]]:
    """One row per level: units, m(full) / m(empty), the fewest units reaching f >= 0.5 / 0.8 / 0.9 (on the
    grid of sizes), the same for the random baseline, f of the full set, error-node figures (feature level)."""
    out = []
    for name, c in report.curves.items():
        row: dict[str, Any] = {"level": name, "units": c.n_units, "m_full": c.m_full, "m_empty": c.m_empty}
        for t in TARGETS:
            row[f"units_f{int(t * 100)}"] = c.units_to_reach(t)
        rnd = next((k for k, f in zip(c.units, c.random, strict=False) if f >= 0.8), None) if c.random else None
        row["random_units_f80"] = rnd
        share = c.extra.get("error_share")
        row["f_errors_only"] = share["f_errors_only"] if share else None
        row["f_features_only"] = share["f_features_only"] if share else None
        row["error_score_share"] = share["score_share"] if share else None
        row["seconds"] = c.scores_seconds + c.eval_seconds
        out.append(row)
    return out


HEADERS = ("level", "units", "m_full", "m_empty", "units_f50", "units_f80", "units_f90", "random_units_f80",
           "f_errors_only", "f_features_only", "error_score_share", "seconds")


def format_table(table: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`rows`."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in table:
        cells = [_fmt(r[h], ".1f" if h == "seconds" else ".3f") for h in HEADERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(report: LevelsReport) -> str:
    """Every measured point: level, units kept, f, random f (mean +- std), kinds of the kept units."""
    lines = ["| level | units kept | f | random f | kept by kind |", "|---|---|---|---|---|"]
    for name, c in report.curves.items():
        for i, k in enumerate(c.units):
            r = f"{c.random[i]:.3f} ± {c.random_std[i]:.3f}" if c.random else "-"
            kinds = ", ".join(f"{kd} {n}" for kd, n in c.kinds_kept[i].items() if n) if c.kinds_kept else ""
            lines.append(f"| {name} | {k} | {c.faithfulness[i]:.3f} | {r} | {kinds} |")
    return "\n".join(lines)


def plot_levels(report: LevelsReport, path: str | Path) -> Path:
    """Faithfulness against units kept, one curve per level, random baselines dashed (module docstring)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2), constrained_layout=True)
    for i, (name, c) in enumerate(report.curves.items()):
        colour = COLOURS.get(name, f"C{i}")
        label = f"{name} circuit ({c.n_units} units)"
        share = c.extra.get("error_share")
        if share:
            label += (f"; errors alone f={share['f_errors_only']:.2f}, "
                      f"features w/o errors f={share['f_features_only']:.2f}")
        ax.plot(c.units, c.faithfulness, color=colour, marker=MARKERS.get(name, "o"), lw=2, ms=5, label=label)
        if c.random:
            ax.plot(c.units, c.random, color=colour, ls="--", lw=1.2, alpha=0.8,
                    label=f"{name}: random units (mean of {report.config.random_seeds} seeds)")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("units kept in the circuit (log scale; all other units of the level ablated)")
    ax.set_ylabel("faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty))")
    s = report.split
    ax.set_title(f"{report.model} / {report.task}: faithfulness by level, {report.config.ablation} ablation, "
                 f"{report.config.scorer} ranking\n(discovered on {s['n_discovery']} prompts, measured on "
                 f"{s['n_heldout']} held-out prompts)", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown(report: LevelsReport) -> str:
    s = report.split
    parts = [f"# Faithfulness by level: {report.model} / {report.task}", "",
             f"Discovered on {s['n_discovery']} prompts, measured on {s['n_heldout']} held-out prompts (seed "
             f"{s['seed']}); {report.config.ablation} ablation; units ranked by |{report.config.scorer} score|. "
             "`units_fX`: the fewest units on the grid whose circuit reaches f >= X (`-`: none).", ""]
    parts += [f"**{w}**" for w in report.warnings]
    if report.warnings:
        parts.append("")
    parts += [format_table(rows(report)), "", "![faithfulness by level](levels.png)", "", "## Every point", "",
              curve_table(report), ""]
    for name, c in report.curves.items():
        parts += [f"## Top units: {name}", "", ", ".join(f"`{u}` {v:+.3g}" for u, v in c.top_units[:12]), ""]
    return "\n".join(parts)


def write_levels_report(report: LevelsReport, out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``levels.png`` into ``out``."""
    out = Path(out)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "levels.png"}
    atomic_write(paths["json"], json.dumps({**report.to_dict(), "rows": rows(report)}, indent=1,
                                           allow_nan=True) + "\n")
    plot_levels(report, paths["plot"])
    atomic_write(paths["markdown"], markdown(report))
    return paths


__all__ = ["rows", "format_table", "curve_table", "plot_levels", "markdown", "write_levels_report", "HEADERS"]
