"""``circuitexplain eval circuits`` on a tracr model: files, exact keys, and ground truth recovered.

Marked ``tracr`` (fails under ``CI`` when the extra is missing, skips locally).
"""

import argparse
import csv
import json

import pytest

pytestmark = [pytest.mark.tracr, pytest.mark.usefixtures("need_tracr")]



def run_cli(argv):
    from evals.cli import register

    parser = argparse.ArgumentParser(prog="circuitexplain")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_circuits_tracr_reverse(tmp_path, capsys):
    from evals.run import RESULT_KEYS

    out = tmp_path / "rev"
    code = run_cli(["eval", "circuits", "--model", "tracr-reverse", "--methods", "eap,node-patch", "-n", "16",
                    "--random-seeds", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eap" in printed and "random" in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["eap", "node-patch", "random"]
    for r in rows:
        assert tuple(r) == RESULT_KEYS
    eap, node, rnd = rows
    # the task circuit is embed -> reverse head <v> -> logits; EAP's gradients single it out exactly
    assert eap["auc"] == pytest.approx(1.0)
    assert eap["edges"] >= 2 and isinstance(eap["forward_passes"], int) and eap["seconds"] > 0
    assert node["auc"] == pytest.approx(1.0)  # node level: the reverse head is the only reference node
    # 2 of 84 edges carry everything: the top 5 % (4 edges) are already faithful, random circuits are not
    assert eap["cpr"] > rnd["cpr"] + 0.2
    assert rnd["edges"] is None and 0.0 <= rnd["auc"] <= 1.0
    with (out / "results.csv").open() as f:
        assert tuple(next(csv.reader(f))) == RESULT_KEYS
    assert "| eap |" in (out / "results.md").read_text()
    for png in ("faithfulness.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    details = json.loads((out / "details.json").read_text())
    assert details["reference"]["edges"] and details["faithfulness"]["counts"][-1] == 84
    # resample ablation: the task circuit; every output position is read (held-out prompts x 3 positions)
    assert "task circuit" in details["reference"]["source"] and len(details["reference"]["edges"]) == 2
    assert details["split"]["rows_heldout"] == 3 * details["split"]["n_heldout"]


@pytest.mark.parametrize("model,n_ref", [("tracr-reverse", 11), ("tracr-frac_prevs", 5)])
def test_acdc_recovers_the_program_circuit_under_zero_ablation(tmp_path, model, n_ref):
    """Conmy et al.'s protocol: zero ablation, the l2 metric over every output position, the program circuit as
    ground truth, ACDC's ROC from its tau sweep. Target (as in the paper): AUC 1.0. EAP and EAP-IG (task
    metric over all positions) are reported whatever they reach."""
    from evals.faithfulness import FaithfulnessConfig
    from evals.run import EvalConfig, evaluate_methods

    cfg = EvalConfig(methods=("acdc", "eap", "eap-ig"), n_prompts=32, ablation="zero",
                     faithfulness=FaithfulnessConfig(random_seeds=2))
    report = evaluate_methods(model, None, cfg)
    assert "program circuit" in report.reference.source and len(report.reference.edges) == n_ref
    rows = {r["method"]: r for r in report.rows}
    assert report.methods["acdc"]["scoring_metric"] == "l2" and rows["acdc"]["ranking"] == "acdc-tau"
    assert rows["acdc"]["auc"] == pytest.approx(1.0)
    assert report.rocs["acdc"]["edge"].auc == pytest.approx(1.0)
    for m in ("eap", "eap-ig"):
        assert 0.0 <= rows[m]["auc"] <= 1.0 and rows[m]["ranking"] == "abs-score"

def test_eval_rejects_foreign_task_for_tracr(tmp_path):
    with pytest.raises(ValueError, match="has only its own task"):
        run_cli(["eval", "circuits", "--model", "tracr-frac_prevs", "--task", "ioi", "--out", str(tmp_path)])
