"""The files ``circuitexplain eval circuits`` writes: a text table, results.json / .csv / .md, details.json
and the plots (:mod:`evals.plots`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from evals.run import RESULT_KEYS, EvalReport

COLUMNS = (("method", "method", "<12s"), ("ranking", "ranking", "<14s"), ("cpr", "CPR", "7.3f"),
           ("cpr_train", "CPR in", "7.3f"), ("cmd", "CMD", "7.3f"), ("cmd_train", "CMD in", "7.3f"),
           ("f", "f", "6.3f"), ("f_train", "f in", "6.3f"), ("kl", "KL", "7.3f"), ("auc", "AUC", "6.3f"),
           ("seconds", "seconds", "8.2f"), ("forward_passes", "passes", "7d"), ("edges", "edges", "6d"))


def _cell(v: Any, spec: str) -> str:
    """``v`` formatted by the type and precision of ``spec`` (no width); ``-`` for None."""
    if v is None:
        return "-"
    kind = spec[-1]
    if kind == "f":
        return format(v, "." + spec.split(".")[1])
    return format(v, "d") if kind == "d" else str(v)


def _width(spec: str) -> int:
    return int("".join(c for c in spec.split(".")[0] if c.isdigit()))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the result rows ("in" = on the discovery prompts, in-sample)."""
    def pad(text: str, spec: str) -> str:
        return text.ljust(_width(spec)) if spec.startswith("<") else text.rjust(_width(spec))

    head = " ".join(pad(title, spec) for _, title, spec in COLUMNS)
    lines = [head, "-" * len(head)]
    lines += [" ".join(pad(_cell(r[key], spec), spec) for key, _, spec in COLUMNS) for r in rows]
    return "\n".join(lines)


def write_report(report: EvalReport, out: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (rows with exactly :data:`RESULT_KEYS`), ``results.csv``, ``results.md``,
    ``details.json``, ``faithfulness.png`` (held out), ``faithfulness_train.png`` (discovery prompts, when
    split) and with a reference ``roc.png``; returns the paths. Files are written whole or not at all
    (temporary file + rename)."""
    from evals.plots import plot_faithfulness, plot_rocs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "details": out / "details.json", "faithfulness_png": out / "faithfulness.png"}
    _atomic(paths["json"], json.dumps(report.rows, indent=1) + "\n")
    tmp = paths["csv"].with_name(paths["csv"].name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULT_KEYS))
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in report.rows])
    tmp.replace(paths["csv"])
    _atomic(paths["details"], json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    title = _title(report)
    held = "held-out" if not report.split.get("in_sample_only") else "in-sample"
    plot_faithfulness(report.faithfulness, paths["faithfulness_png"], title=f"{title}: {held} prompts")
    if not report.split.get("in_sample_only"):
        paths["faithfulness_train_png"] = out / "faithfulness_train.png"
        plot_faithfulness(report.faithfulness_train, paths["faithfulness_train_png"],
                          title=f"{title}: discovery prompts (in-sample)")
    if report.rocs:
        paths["roc_png"] = out / "roc.png"
        plot_rocs(report.rocs, paths["roc_png"], title=title)
    _atomic(paths["md"], _markdown(report, paths))
    return paths


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _title(report: EvalReport) -> str:
    task = "" if report.task == report.model else f" / {report.task}"
    return f"{report.model}{task} ({report.config.ablation} ablation)"


def split_sentence(report: EvalReport) -> str:
    s = report.split
    if s.get("in_sample_only"):
        return (f"All {s['n_prompts']} prompts were used both to discover and to evaluate (--split 0): every "
                f"number is in-sample.")
    text = (f"{s['n_prompts']} prompts, split with seed {s['seed']}: methods discovered on {s['n_discovery']}, "
            f"CPR / CMD / f / KL are measured on the {s['n_heldout']} held out (a fraction {s['split']:g}); "
            f"`CPR in`, `CMD in`, `f in` on the discovery prompts (in-sample).")
    if s.get("cross_fit"):
        text += (" Cross-fitted: everything ran again with the two sets swapped, and the table shows the means of "
                 "both ways (seconds and passes: sums); the plots and ROC curves are the first way's.")
    return text


def _markdown(report: EvalReport, paths: dict[str, Path]) -> str:
    from circuits.algorithms.base import RANKING_KINDS

    f = report.faithfulness
    cfg = f.config
    circuits = ("the connected circuit `discover --topk k` keeps" if cfg.circuits == "connected"
                else "the literal top k edges (not pruned to connected)")
    lines = [f"# Circuit evaluation: {_title(report)}", "", split_sentence(report), "",
             f"Metric `{f.metric}` (held out: full model {f.m_full:.4g}, empty circuit {f.m_empty:.4g}); "
             f"{f.n_edges} edges; sizes {', '.join(f'{p:g}%' for p in cfg.percentages)} = "
             f"{', '.join(str(c) for c in f.counts)} edges (floor); the circuit at size k is {circuits}. "
             f"CPR = area under f, CMD = area under |1 - f| (trapezoids over the fraction of edges, MIB). "
             f"`f`, `KL` = the method's own circuit (KL to the full model, held out). `random` = mean over "
             f"{cfg.random_seeds} random rankings.", "",
             "| method | ranking | CPR | CPR in | CMD | CMD in | f | f in | KL | AUC | seconds | forward passes "
             "| edges |", "|---|---|" + "---:|" * 11]
    for r in report.rows:
        lines.append("| " + " | ".join(_cell(r[k], spec) for k, _, spec in COLUMNS) + " |")
    lines.append("")
    kinds = sorted({r["ranking"] for r in report.rows if r["ranking"] in RANKING_KINDS})
    if kinds:
        lines += ["Rankings: " + "; ".join(f"`{k}`: {RANKING_KINDS[k]}" for k in kinds) + ".", ""]
    if report.reference is not None:
        ref = report.reference
        lines += [f"Reference circuit ({ref.source}): {len(ref.edges)} edges, {len(ref.nodes)} nodes: "
                  f"{', '.join(f'`{e}`' for e in ref.edges)}. AUC at edge level for edge methods, node level for "
                  "node methods; ACDC's AUC is Conmy et al.'s over its tau sweep (one ROC point per tau, "
                  "dominated points dropped, staircase area).", ""]
    else:
        lines += ["No reference circuit for this model: AUC is not available.", ""]
    lines.append(f"![faithfulness curves, held out]({paths['faithfulness_png'].name})")
    if "faithfulness_train_png" in paths:
        lines.append(f"![faithfulness curves, discovery prompts]({paths['faithfulness_train_png'].name})")
    if "roc_png" in paths:
        lines.append(f"![ROC curves]({paths['roc_png'].name})")
    return "\n".join(lines) + "\n"


__all__ = ["format_table", "write_report", "split_sentence"]
