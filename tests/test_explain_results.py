"""The saved smollm2-135m explanation results (docs/results/explain/, docs/explainers.md "Results") are
self-consistent: every score recomputes from its saved scorer record (simulation and tokens: scipy's Pearson
r; embedding: the Mann-Whitney AUC), only held-out exemplars were scored, and baselines.json's real scores are
the runs' scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.stats import mannwhitneyu, pearsonr

from evals.explanation_scores import score_record

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "explain"
RUNS = sorted(p.parent for p in RESULTS.glob("*/explanations.jsonl"))


def _lines(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "explanations.jsonl").read_text().splitlines() if s.strip()]


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_saved_scores_recompute_from_their_records(run: Path):
    lines = _lines(run)
    assert lines and json.loads((run / "summary.json").read_text())["units"] == len(lines)
    for ln in lines:
        shown = set(ln["exemplar_ids"]["explainer"])
        for name, rec in ln["scorer_records"].items():
            assert not shown & set(rec["record_ids"]), f"{ln['unit']} {name}: scored on a shown exemplar"
            assert set(rec["record_ids"]) <= set(ln["exemplar_ids"]["held_out"])
            got = score_record(rec)
            assert got == ln["scores"][name] or (got is None and ln["scores"][name] is None)
            if got is None:
                continue
            p, a = rec["predicted"], rec["actual"]
            if rec["metric"] == "pearson":
                assert got == pytest.approx(pearsonr(p, a)[0], abs=1e-9)
            elif rec["metric"] == "auc":
                pos = [x for x, y in zip(p, a, strict=True) if y == 1]
                neg = [x for x, y in zip(p, a, strict=True) if y == 0]
                u = mannwhitneyu(pos, neg).statistic
                assert got == pytest.approx(u / (len(pos) * len(neg)), abs=1e-9)


def test_baselines_real_scores_are_the_runs_scores():
    b = json.loads((RESULTS / "baselines.json").read_text())
    assert {Path(r).name for r in b["runs"]} == {r.name for r in RUNS}
    for run, r in b["runs"].items():
        lines = {ln["unit"]: ln for ln in _lines(RESULTS / Path(run).name)}
        for name, d in r["scorers"].items():
            for unit, real, shuf in zip(r["units"], d["real"], d["shuffled"], strict=True):
                assert real == lines[unit]["scores"].get(name)
                assert shuf is None or (math.isfinite(shuf) and -1 <= shuf <= 1)
