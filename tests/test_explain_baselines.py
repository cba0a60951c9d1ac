"""scripts/explain_baselines.py: the shuffled-explanation baseline, offline (tokens scorer), against
hand-computed Pearson correlations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import explain_baselines as eb  # noqa: E402


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 7, 20):
        for seed in range(5):
            p = eb.derangement(n, seed)
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
            assert p == eb.derangement(n, seed)
    with pytest.raises(ValueError, match="at least 2"):
        eb.derangement(1, 0)


def _exemplar(uid: str, i: int, tokens: list[str], acts: list[float]) -> dict:
    return {"id": f"doc{i}:0-{len(tokens)}", "side": "held_out", "source": "top", "context": i, "document": i,
            "doc_start": 0, "token_ids": list(range(len(tokens))), "tokens": tokens, "activations": acts}


def _line(unit: str, word: str, texts: list[list[str]], score: float) -> dict:
    held = [_exemplar(unit, i, t, [2.0 if w.strip() == word else 0.0 for w in t]) for i, t in enumerate(texts)]
    return {"unit": unit, "explanation": word, "explainer": "vocab", "tokens": [word],
            "scores": {"tokens": score}, "exemplar_ids": {"explainer": ["doc99:0-3"], "held_out": [h["id"] for h in held]},
            "exemplars": {"unit": unit, "explain": [], "held_out": held}}


def test_shuffled_baseline_scores_other_units_explanations(tmp_path: Path):
    texts = [["the", " cat", " sat"], ["a", " dog", " ran"], ["my", " cat", " and", " dog"], ["no", " pets"]]
    run = tmp_path / "run"
    run.mkdir()
    lines = [_line("m1.n1", "cat", texts, 1.0), _line("m1.n2", "dog", texts, 1.0)]
    (run / "explanations.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    assert eb.main([str(run), "--scorers", "tokens", "--out", str(out), "--markdown", str(md)]) == 0
    res = json.loads(out.read_text())["runs"][str(run)]["scorers"]["tokens"]
    # with two units the derangement swaps them: "dog" predicts the cat unit and the other way round
    flat = [w for t in texts for w in t]
    cat = np.array([2.0 if w.strip() == "cat" else 0.0 for w in flat])
    dog = np.array([1.0 if w.strip() == "dog" else 0.0 for w in flat])
    expected = pearsonr(dog, cat)[0]
    assert res["shuffled"] == pytest.approx([expected, expected], abs=1e-9)
    assert res["real"] == [1.0, 1.0] and res["real_beats_shuffled"] == 2 and res["pairs"] == 2
    table = md.read_text()
    assert f"| run | vocab | 1.00 / {expected:.2f} (2/2) |" in table and "| m1.n2 | dog | ' dog', ' dog' | 1.00 |" in table
