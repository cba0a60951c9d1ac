"""Write a study's results: ``study.json``, ``study.csv``, ``study.md`` and plots (see :mod:`evals.study`).

``study.json`` holds the command, the settings, every unit's row (config, metrics, density summary) and, for the
centring study, the matched-L0 records and the centring effects; ``study.csv`` one line per unit (scalar columns);
``study.md`` the tables and the counts the conclusions rest on, computed from the rows (nothing typed in).
Plots: centring study ``centring-MODEL.png`` (EV, CE recovered, error_linear_r2, error_kl_ratio against L0 per
architecture, one colour per centring, raw per-seed points and the matched-L0 means with seed std);
SAE study ``ev_ce_vs_width.png`` (EV and CE recovered against dictionary size, one line per model) and
``density.png`` (each model's feature-density histogram at the reference width).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.study import METRICS, centring_effects, matched_l0

CENTRING_COLOURS = {"none": "tab:red", "learned": "tab:blue", "mean": "tab:green"}
CSV_SKIP = ("unit", "density_hist", "density_bins")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in CSV_SKIP and k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols})
    return buf.getvalue()


def _f(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def _table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def _planned(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    if "units_planned" in s and s["units_planned"] != s.get("units_reported"):
        return (f"**Partial: {s.get('units_reported')} of the {s['units_planned']} planned SAEs are finished; this "
                f"report holds those only.**\n")
    return ""


def write_study(out_dir: str | os.PathLike, study: str, rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                command: str, *, plots: bool = True) -> dict[str, Any]:
    """Write the four kinds of output for ``study`` (``saes`` or ``centring``) into ``out_dir``; returns the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k != "unit"} for r in rows]
    doc: dict[str, Any] = {"study": study, "command": command, "settings": settings, "rows": clean}
    if study == "centring":
        doc["matched"] = matched_l0(clean, n_points=int(settings.get("points", 3)))
        doc["effects"] = centring_effects(doc["matched"])
        md = _centring_md(doc)
    elif study == "saes":
        md = _saes_md(doc)
    else:
        raise ValueError(f"study {study!r} unknown; one of saes, centring")
    _atomic_write(out / "study.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    _atomic_write(out / "study.csv", _csv(clean))
    _atomic_write(out / "study.md", md)
    if plots:
        if study == "centring":
            for model in dict.fromkeys(r["model"] for r in clean):
                _plot_centring(doc, model, out / f"centring-{model}.png")
        else:
            _plot_saes(doc, out)
    return doc


# ---------------------------------------------------------------------------------------------------------------
# centring

def _centring_md(doc: dict[str, Any]) -> str:
    rows, matched, effects = doc["rows"], doc["matched"], doc["effects"]
    parts = [f"# SAE centring at matched L0\n\nCommand: `{doc['command']}`\n", _planned(doc),
             f"{len(rows)} SAEs; settings: `{json.dumps(doc['settings'], sort_keys=True)}`\n",
             "## Matched L0 (mean ± std over seeds; linear interpolation in log L0)\n"]
    lines = []
    for r in matched:
        lines.append([r["model"], r["arch"], r["l0"], r["centring"], r["n_seeds"]] +
                     [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in METRICS[:4]])
    parts.append(_table(["model", "arch", "L0", "centring", "seeds", *METRICS[:4]], lines))
    parts.append("\n## Mean centring minus the others at matched L0 (negative = mean centring has less "
                 "structured error)\n")
    lines = [[e["model"], e["arch"], e["l0"], e["versus"],
              f"{e['d_error_linear_r2']:+.3f} ± {e['d_error_linear_r2_std']:.3f}",
              f"{e['d_error_kl_ratio']:+.3f} ± {e['d_error_kl_ratio_std']:.3f}"] for e in effects]
    parts.append(_table(["model", "arch", "L0", "mean minus", "Δ error_linear_r2", "Δ error_kl_ratio"], lines))
    parts.append("\n## Counts\n")
    for model in dict.fromkeys(e["model"] for e in effects):
        for versus in ("none", "learned"):
            es = [e for e in effects if e["model"] == model and e["versus"] == versus]
            for m in ("error_linear_r2", "error_kl_ratio"):
                d = [e[f"d_{m}"] for e in es if not math.isnan(e[f"d_{m}"])]
                sig = [e for e in es if not math.isnan(e[f"d_{m}"]) and e[f"d_{m}_std"] > 0
                       and abs(e[f"d_{m}"]) > 2 * e[f"d_{m}_std"]]
                parts.append(f"- {model}, mean vs {versus}, {m}: lower at {sum(x < 0 for x in d)} of {len(d)} "
                             f"matched points (mean Δ {sum(d) / max(1, len(d)):+.3f}); beyond 2 seed-std: "
                             f"{sum(e[f'd_{m}'] < 0 for e in sig)} lower, {sum(e[f'd_{m}'] > 0 for e in sig)} "
                             f"higher")
    parts.append("\n## All SAEs\n")
    lines = [[r["model"], r["arch"], r["centring"], r["sparsity_knob"], r["sparsity"], r["seed"], r["l0"],
              r["explained_variance"], r["ce_loss_recovered"], r["error_linear_r2"], r["error_kl_ratio"],
              r["dead_fraction"], r["mean_error_data_cos"]] for r in rows]
    parts.append(_table(["model", "arch", "centring", "knob", "value", "seed", "L0", "EV", "CE rec", "err r2",
                         "KL ratio", "dead", "cos(mean e, mean x)"], lines))
    return "\n".join(parts) + "\n"


def _plot_centring(doc: dict[str, Any], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in doc["rows"] if r["model"] == model]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    metrics = METRICS[:4]
    fig, axes = plt.subplots(len(metrics), len(archs), figsize=(3.2 * len(archs), 2.5 * len(metrics)),
                             squeeze=False)
    for j, arch in enumerate(archs):
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            for c, colour in CENTRING_COLOURS.items():
                pts = sorted((r["l0"], r[m]) for r in rows if r["arch"] == arch and r["centring"] == c)
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=colour, alpha=0.45)
                mt = [r for r in doc["matched"] if r["model"] == model and r["arch"] == arch and r["centring"] == c]
                if mt:
                    ax.errorbar([r["l0"] for r in mt], [r[m] for r in mt], yerr=[r[m + "_std"] for r in mt],
                                color=colour, marker="o", ms=3, lw=1.2, capsize=2, label=c)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if i == 0:
                ax.set_title(arch)
            if j == 0:
                ax.set_ylabel(m.replace("_", " "))
            if i == len(metrics) - 1:
                ax.set_xlabel("L0")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, title="centring", title_fontsize=7)
    fig.suptitle(f"{model}: centring at matched L0 (dots: SAEs; lines: matched-L0 mean ± seed std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# architectures and scale

def _saes_md(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    ref = doc["settings"].get("reference_width_ratio")
    parts = [f"# SAEs across architectures and scale\n\nCommand: `{doc['command']}`\n", _planned(doc),
             f"{len(rows)} SAEs; settings: `{json.dumps(doc['settings'], sort_keys=True)}`\n",
             "## All SAEs\n"]
    lines = [[r["model"], r["model_type"], r["n_layers"], r["d_model"], r["hook"], r["relative_depth"], r["arch"],
              r["width"], r["width_ratio"], r["sparsity"], r["seed"], r["l0"], r["explained_variance"],
              r["ce_loss_recovered"], r["error_linear_r2"], r["error_kl_ratio"], r["dead_fraction"],
              r["dense_fraction"], r["rare_fraction"], r["median_log10_density"]] for r in rows]
    parts.append(_table(["model", "type", "layers", "d_model", "hook", "depth", "arch", "width", "ratio",
                         "k / coef", "seed", "L0", "EV", "CE rec", "err r2", "KL ratio", "dead", "dense (>0.1)",
                         "rare (<1e-3)", "median log10 density"], lines))
    if ref is not None:
        parts.append(f"\n## Feature density at width {ref:g}x d_model\n")
        sel = [r for r in rows if math.isclose(r["width_ratio"], ref, rel_tol=1e-6)]
        sel.sort(key=lambda r: (r["model_type"], r["d_model"], r["n_layers"]))
        lines = [[r["model"], r["n_layers"], r["d_model"], r["width"], r["dead_fraction"], r["dense_fraction"],
                  r["rare_fraction"], r["median_log10_density"], r["explained_variance"]] for r in sel]
        parts.append(_table(["model", "layers", "d_model", "width", "dead", "dense (>0.1)", "rare (<1e-3)",
                             "median log10 density", "EV"], lines))
    return "\n".join(parts) + "\n"


def _plot_saes(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = doc["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(len(archs), 2, figsize=(9, 3.4 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, m in enumerate(("explained_variance", "ce_loss_recovered")):
            ax = axes[i][j]
            for model in models:
                pts = sorted((r["width"], r[m]) for r in rows if r["model"] == model and r["arch"] == arch)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=model)
            ax.set_xscale("log")
            ax.set_xlabel("dictionary size (latents)")
            ax.set_ylabel(m.replace("_", " "))
            ax.set_title(f"{arch}: {m.replace('_', ' ')}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ev_ce_vs_width.png", dpi=100)
    plt.close(fig)

    ref = doc["settings"].get("reference_width_ratio")
    sel = [r for r in rows if ref is None or math.isclose(r["width_ratio"], ref, rel_tol=1e-6)]
    seen: dict[str, dict[str, Any]] = {}
    for r in sel:
        seen.setdefault(r["model"], r)
    n = len(seen)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (model, r) in zip(axes.flat, seen.items(), strict=False):
        ax.set_visible(True)
        edges = np.asarray(r["density_bins"])
        counts = np.asarray(r["density_hist"], dtype=float) / r["width"]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
        ax.set_title(f"{model} ({r['width']} latents, dead {r['dead_fraction']:.2f})", fontsize=8)
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("share of latents")
        ax.set_xlim(edges[0], edges[-1])
    fig.suptitle("feature density on held-out tokens" + (f" at {ref:g}x d_model" if ref else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=100)
    plt.close(fig)
