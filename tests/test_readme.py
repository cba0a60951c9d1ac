"""The README's Python example runs as written (the front door must not rot)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


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
