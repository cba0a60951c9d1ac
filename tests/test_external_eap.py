"""Our EAP and exact edge patching against a published implementation: auto-circuit (Miller et al. 2024) on
TransformerLens 2.18's HookedTransformer, run in its own venv (``make autocircuit-env``, which ``make test``
builds) by scripts/compare_eap_external.py, on the same token ids and the same HF weights.

Models: a random 3-layer Llama with grouped-query attention (6 query / 2 k/v heads) and the first 4 layers of
the real SmolLM2-135M-Instruct (real weights, GQA 9/3, real IOI prompts; the full 30-layer comparison is the
benchmark, benchmarks/eap-external-smollm2-135m.json, too slow for a test on 2 cores).

Tolerance (float32, both sides the same mathematics through different kernels: HF's attention and matmuls vs
TransformerLens' einsums): each score is a sum over prompts x positions x d_model of gradient x activation
difference, with the gradient back-propagated through the whole network. float32's unit roundoff is
u = 2^-24 = 6e-8 and the longest reduction in a layer has n = d_mlp = 1536 terms, so one dot product may be off
by n*u = 9e-5 of its magnitude in the worst case (sqrt(n)*u = 2.4e-6 typically). We allow
``1e-4 * max|score| + 1e-6`` on every edge: the worst-case bound of one reduction, far below any difference of
convention (sign, a missed edge, a k/v head shared instead of per query head, a position offset), each of which
moves scores by O(max|score|). An exact patching score is a difference of two logit differences, each computed
to that relative precision of *its own* magnitude, so its scale is the clean logit difference, not the score:
``1e-4 * max|clean logit difference| + 1e-6``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_eap_external as cmp  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def autocircuit_venv():
    """The auto-circuit venv: skip locally without it, fail under CI (``make test`` builds it first, so a missing
    venv there is a broken environment, not a reason to skip)."""
    if not (cmp.VENV / "bin" / "python").is_file():
        msg = f"no auto-circuit venv at {cmp.VENV}: run `make autocircuit-env` (scripts/autocircuit_env.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return cmp.VENV


def assert_agree(report: dict, method: str) -> None:
    m = report["methods"][method]
    assert m["max_abs_score"] > 1e-3, f"{method}: scores all ~0, nothing was compared"
    scale = m["max_abs_score"]
    if method == "exact":
        scale = max(abs(x) for x in report["checks"]["clean_logit_diff_ours"])
    assert m["max_abs_diff"] <= RTOL * scale + ATOL, (method, m)
    assert m["pearson"] > 0.99999, (method, m)


def test_edge_name_mapping_round_trip_on_both_graphs():
    """Every one of our edge ids (q/k/v inputs, MLPs, logits, embed) maps to auto-circuit's names and back."""
    for e in ("embed->a0.h0<q>", "a0.h1->a3.h2<k>", "m0->a1.h8<v>", "a29.h8->m29", "m29->logits",
              "embed->logits", "embed->m0"):
        src, dest = cmp.ours_to_theirs(e)
        assert cmp.theirs_to_ours(src, dest) == e
    assert cmp.ours_to_theirs("a0.h1->a3.h2<k>") == ("A0.1", "A3.2.K")
    assert cmp.ours_to_theirs("m3->logits") == ("MLP 3", "Resid End")
    assert cmp.ours_to_theirs("embed->m0") == ("Resid Start", "MLP 0")
    with pytest.raises(ValueError, match="no counterpart"):
        cmp.theirs_to_ours("Resid Post 3", "MLP 4")


def test_agreement_reports_a_planted_difference_and_refuses_unequal_edge_sets():
    ours = {f"e{i}": float(i) for i in range(200)}
    theirs = dict(ours, e7=7.5)
    m = cmp.agreement(ours, theirs, ks=(10,))
    assert m["max_abs_diff"] == 0.5 and m["worst_edge"] == "e7" and m["top10_overlap"] == 1.0
    assert m["rel_diff_to_max"] == pytest.approx(0.5 / 199)
    with pytest.raises(ValueError, match="edge sets differ"):
        cmp.agreement(ours, {k: v for k, v in ours.items() if k != "e3"})


def test_tiny_gqa_eap_and_exact_patching_match_autocircuit(autocircuit_venv, tmp_path):
    from circuits.models import load_model

    model_dir = cmp.tiny_gqa_dir(tmp_path / "model")
    model = load_model(model_dir, device="cpu", dtype="float32")
    batch = cmp.tiny_batch(4, seed=0)
    torch.manual_seed(0)
    r = cmp.compare(model, model_dir, batch, None, tmp_path, n_exact=12, syed=True, log=lambda s: None)
    assert r["n_edges"]["ours"] == r["n_edges"]["theirs"] == r["methods"]["eap"]["n"]
    assert r["checks"]["their_tl_vs_hf_max_abs_logit"] < 1e-4
    assert r["checks"]["clean_logit_diff_max_abs_diff"] < 1e-4
    assert r["checks"]["their_all_edges_ablated_vs_corrupt_max_abs"] < 1e-4
    for method in ("eap", "eap_syed", "exact"):
        assert_agree(r, method)


def test_smollm2_first_layers_eap_and_exact_patching_match_autocircuit(autocircuit_venv, tmp_path):
    """Real SmolLM2 weights (layers 0-3, GQA 9 query / 3 k/v heads) on real-English IOI prompts."""
    from circuits.models import load_model
    from circuits.pretrained import ensure_model
    from circuits.tasks import get_task

    try:
        src = ensure_model("smollm2-135m", progress=False)
    except (ValueError, RuntimeError, OSError) as e:
        pytest.fail(f"smollm2-135m cannot be built: {e}")
    model_dir = cmp.first_layers_dir(src, tmp_path / "model", 4)
    model = load_model(model_dir, device="cpu", dtype="float32")
    task = get_task("ioi", n=32, seed=11, tokenizer=model.tokenizer)
    batch = cmp.equal_length(task.batch(model.tokenizer), 2)
    r = cmp.compare(model, model_dir, batch, model.tokenizer, tmp_path, n_exact=6, log=lambda s: None)
    # by hand: layer L's 27 q/k/v inputs read embed + 10 L senders, its MLP also its 9 heads; logits read all 41
    assert r["n_edges"]["ours"] == r["n_edges"]["theirs"] == sum(27 * (1 + 10 * L) + 10 + 10 * L
                                                                 for L in range(4)) + 41
    assert r["checks"]["their_tl_vs_hf_max_abs_logit"] < 1e-3
    assert r["checks"]["clean_logit_diff_max_abs_diff"] < 1e-3
    for method in ("eap", "exact"):
        assert_agree(r, method)
