"""The README's second Python example (the explanation half on one unit) runs as written, and what it prints
is what the library's pieces give on their own: the splice leaves the logits unchanged, the unit activations
are the hook's activations, the lens is the unit's W_out row through the unembedding."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_explainers_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README has no second python example (the explainers)"
    scope: dict = {}
    exec(compile(blocks[1], "README.md:python#2", "exec"), scope)
    model, tokens, neurons, unit = scope["model"], scope["tokens"], scope["neurons"], scope["unit"]
    # the splice is exact: same logits as a plain forward, unit activations = the hook's activations
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == neurons.hook)
    torch.testing.assert_close(scope["logits"], model(tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["acts"], cache[neurons.hook], atol=1e-6, rtol=0)
    # the direction is the neuron's W_out row; the lens's top token is the argmax of its unembedding
    w_out = model.blocks[1].mlp.W_out[unit.index]
    assert torch.allclose(scope["direction"].float(), w_out.float(), atol=1e-6)
    assert len(scope["lens"].promoted.tokens) == 5 and len(scope["ov"].outputs.tokens) == 5
    assert isinstance(scope["words"], str) and scope["words"].strip()
    assert capsys.readouterr().out.strip()
