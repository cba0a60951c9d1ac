"""The README's Python example runs as written, and the circuit figures of the README and docs/evaluation.md are
what their commands produce.

Figures: every markdown table in README.md or docs/evaluation.md whose header has a ``command`` column (a `circuitexplain discover`
or `circuitexplain eval circuits` command in backticks per row), and every table that follows a line holding
a backticked `circuitexplain eval circuits ...` command, is recomputed here by running that command's
arguments through the real CLI parser and the library, and compared cell by cell (numbers to the printed
precision). A README figure that no longer matches what the code measures fails here for a real reason: the
code, a checkpoint or the README changed. Timings (``seconds``, ``s``) are machine-dependent and not compared.
Commands on ``smollm2-135m``, cross-fitted evaluations and the six-method induction evaluations take minutes:
those are marked ``slow`` (run them with ``pytest -m slow tests/test_readme.py``); tracr tables and discover
rows run by default.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURE_FILES = (README, ROOT / "docs" / "evaluation.md")

# README column title -> key of the eval result rows / discover summaries
EVAL_COLUMNS = {"ranking": "ranking", "CPR": "cpr", "CPR in": "cpr_train", "CMD": "cmd", "CMD in": "cmd_train",
                "f": "f", "f in": "f_train", "KL": "kl", "AUC": "auc", "edges": "edges",
                "forward passes": "forward_passes"}
DISCOVER_COLUMNS = {"edges": "edges", "units kept": "units_kept", "faithfulness": "faithfulness",
                    "logit diff recovered": "logit_diff_recovered", "held out": "heldout_faithfulness",
                    "forward passes": "forward_passes", "ablations": "ablations"}
NOT_COMPARED = ("seconds", "s", "time", "wall", "command", "method")
SLOW_MODELS = ("smollm2-135m",)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md:python", "exec"), scope)
    values, G = scope["values"], scope["G"]
    assert values.shape[0] == 3
    # no edge ablated = the clean run; every edge ablated (resample) = the corrupted run
    assert float(values[0].mean()) == pytest.approx(float(scope["patcher"].clean_metric.mean()), abs=1e-4)
    assert float(values[2].mean()) == pytest.approx(float(scope["patcher"].ablated_metric.mean()), abs=1e-4)
    assert G.graph["logit_diff_recovered"] > 0.8
    assert (tmp_path / "ioi.json").is_file() and (tmp_path / "ioi.html").is_file()


# ----------------------------------------------------------------------------------- parsing
def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(text: str) -> list[tuple[int, list[str], list[list[str]]]]:
    """(line number of the header, header cells, rows) of every markdown table."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[i + 1]) \
                and "-" in lines[i + 1]:
            head, rows, j = _cells(lines[i]), [], i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            out.append((i, head, rows))
            i = j
        else:
            i += 1
    return out


def _command(text: str) -> list[str] | None:
    m = re.search(r"`(circuitexplain (?:eval circuits|discover) [^`]+)`", text)
    return shlex.split(m.group(1))[1:] if m else None


def readme_claims(paths=FIGURE_FILES) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """(id, argv, header, rows) per figure table: eval tables (command on a line above the table) and
    discover tables (a command per row)."""
    claims = []
    for path in paths:
        text = path.read_text()
        lines = text.splitlines()
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for start, head, rows in _tables(text):
            if "command" in head:
                for row in rows:
                    argv = _command(row[head.index("command")])
                    if argv and argv[0] == "discover":
                        claims.append((f"{name}:{start + 1}:{' '.join(argv[:8])}", argv, head, [row]))
                continue
            above = "\n".join(lines[max(0, start - 4):start])
            argv = _command(above)
            if argv and argv[:2] == ["eval", "circuits"]:
                claims.append((f"{name}:{start + 1}:{' '.join(argv[:6])}", argv, head, rows))
    return claims


def _number(cell: str) -> tuple[float, int] | None:
    """The number printed in a cell and its decimals (``0.812``, ``81 %``, ``26``); None for '-' / text."""
    m = re.fullmatch(r"\**(-?\d+(?:\.(\d+))?)\s*(%?)\**", cell.replace(",", ""))
    if not m:
        return None
    value = float(m.group(1)) / (100.0 if m.group(3) else 1.0)
    decimals = len(m.group(2) or "") + (2 if m.group(3) else 0)
    return value, decimals


def _compare(where: str, claimed: str, measured, column: str) -> None:
    if measured is None:
        assert claimed in ("-", "n/a", ""), f"{where}: README says {column} = {claimed}, the run gives none"
        return
    if isinstance(measured, str):
        assert claimed.strip("`") == measured, f"{where}: README says {column} = {claimed}, the run gives {measured}"
        return
    num = _number(claimed)
    assert num is not None, f"{where}: README's {column} cell {claimed!r} is not a number"
    value, decimals = num
    tol = 0.6 * 10 ** -decimals + 1e-9  # printed rounding, plus float differences between machines
    assert abs(float(measured) - value) <= tol, \
        f"{where}: README says {column} = {claimed}, the code now measures {float(measured):.{decimals + 2}f}"


# ----------------------------------------------------------------------------------- recomputation
def _run_eval(argv: list[str]) -> dict[str, dict]:
    from circuits.cli import build_parser
    from evals.faithfulness import MIB_PERCENTAGES, FaithfulnessConfig
    from evals.run import EvalConfig, evaluate_methods

    a = build_parser().parse_args([*argv, "--out", "unused"])
    fcfg = FaithfulnessConfig(percentages=a.sizes or MIB_PERCENTAGES, ranking=a.ranking, random_seeds=a.random_seeds,
                              seed=a.seed, circuits=a.circuits)
    cfg = EvalConfig(methods=a.methods, n_prompts=a.n_prompts, split=a.split, seed=a.seed, ablation=a.ablation,
                     per_position=a.per_position, ig_steps=a.ig_steps, chunk_size=a.chunk_size, device="cpu",
                     faithfulness=fcfg, reference=a.reference, positions=a.positions, acdc_taus=a.acdc_taus,
                     acdc_metric=a.acdc_metric, qk_fix=a.qk_fix, prompt_batch=a.prompt_batch, dtype=a.dtype,
                     faithfulness_target=a.faithfulness_target, greedy_warm_start=a.greedy_warm_start,
                     cross_fit=a.cross_fit)
    return {r["method"]: r for r in evaluate_methods(a.model, a.task, cfg).rows}


def _params():
    out = []
    for cid, argv, head, rows in readme_claims():
        model = argv[argv.index("--model") + 1] if "--model" in argv else ""
        long = model in SLOW_MODELS or "--cross-fit" in argv or (argv[0] == "eval" and model == "attn2l-induction")
        marks = [pytest.mark.slow] if long else []
        out.append(pytest.param(argv, head, rows, id=cid, marks=marks))
    return out


def test_circuit_figures_are_stated_with_their_commands():
    """docs/evaluation.md holds the measured tables (README quotes them): eval tables on ioi-2l, tracr under zero
    ablation and induction, and discover runs; each needs its command so it can be rerun."""
    claims = readme_claims((FIGURE_FILES[1],))
    models = {argv[argv.index("--model") + 1] for _, argv, _, _ in claims if "--model" in argv}
    want = {"ioi-2l", "tracr-reverse", "tracr-frac_prevs", "attn2l-induction", "smollm2-135m"}
    assert want <= models, f"docs/evaluation.md has no recomputable figures for {sorted(want - models)}"
    assert any(argv[0] == "discover" for _, argv, _, _ in claims)


@pytest.mark.parametrize("argv,head,rows", _params())
def test_readme_figure_is_what_the_command_measures(argv, head, rows, tmp_path, capsys):
    torch.set_num_threads(1)
    where = f"`circuitexplain {' '.join(argv)}`"
    if argv[0] == "discover":
        import json

        from circuits.cli import main

        out = tmp_path / "g.json"
        assert main([*argv, "--out", str(out), "--json", "--no-progress", "--device", "cpu"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        row = rows[0]
        compared = 0
        for col, cell in zip(head, row, strict=True):
            if col in DISCOVER_COLUMNS:
                _compare(where, cell, summary[DISCOVER_COLUMNS[col]], col)
                compared += 1
        assert compared, f"{where}: no comparable column in {head}"
        return
    measured = _run_eval(argv)
    assert "method" in head, f"{where}: the table has no method column"
    claimed_methods = [r[head.index("method")].strip("`*") for r in rows]
    assert set(claimed_methods) == set(measured), (where, claimed_methods, sorted(measured))
    for row in rows:
        method = row[head.index("method")].strip("`*")
        for col, cell in zip(head, row, strict=True):
            if col in EVAL_COLUMNS and col not in NOT_COMPARED:
                _compare(f"{where} [{method}]", cell, measured[method][EVAL_COLUMNS[col]], col)
