"""Head scoring behind the induction reference, on hand-built attention patterns."""

from types import SimpleNamespace

import pytest
import torch

from evals.references import head_scores, induction_reference


class PatternModel(torch.nn.Module):
    """Returns hand-written attention patterns: layer 0 head 0 attends to the previous token, layer 1 head 1
    to the token after the latest earlier occurrence of the current token (else BOS); every other head
    attends to BOS."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(n_layers=2, n_heads=2, d_vocab=50)
        self.tokenizer = None

    def run_with_cache(self, tokens, names_filter=None):
        n, p = tokens.shape
        bos = torch.zeros(n, p, p)
        bos[:, :, 0] = 1.0
        prev = torch.zeros(n, p, p)
        for t in range(p):
            prev[:, t, max(t - 1, 0)] = 1.0
        ind = bos.clone()
        for b in range(n):
            for t in range(p):
                seen = [j for j in range(t) if tokens[b, j] == tokens[b, t]]
                if seen and seen[-1] + 1 < t:
                    ind[b, t] = 0.0
                    ind[b, t, seen[-1] + 1] = 1.0
        cache = {"blocks.0.attn.hook_pattern": torch.stack([prev, bos], 1),
                 "blocks.1.attn.hook_pattern": torch.stack([bos, ind], 1)}
        return None, cache


def test_head_scores_on_hand_built_patterns():
    model = PatternModel()
    s = head_scores(model, n=4, half=6, seed=0)
    assert s["prev_token"][0, 0] == pytest.approx(1.0)
    assert s["induction"][1, 1] == pytest.approx(1.0)
    assert s["prev_token"][0, 1] == pytest.approx(0.0) and s["induction"][1, 0] == pytest.approx(0.0)
    # the previous-token head also scores on induction positions only by accident: t-1 == j+1 never holds
    assert s["induction"][0, 0] == pytest.approx(0.0)


def test_head_scores_ignore_padding():
    model = PatternModel()
    # row 0: BOS 5 6 7 5 6 | pad pad pad ; position 5 (token 6) follows the repeat of 5 -> induction target 3
    toks = torch.tensor([[0, 5, 6, 7, 5, 6, 9, 9, 9]])
    s = head_scores(model, toks, torch.tensor([5]))
    assert s["induction"][1, 1] == pytest.approx(1.0)  # positions 4, 5 (targets 2, 3); pads 7, 8 ignored


def test_induction_reference_edges_from_measured_heads():
    ref = induction_reference(PatternModel(), min_score=0.5, n=4, half=6)
    assert set(ref.edges) == {"embed->a0.h0<v>", "a0.h0->a1.h1<k>", "embed->a1.h1<v>", "a1.h1->logits"}
    full = induction_reference(PatternModel(), min_score=0.5, n=4, half=6, include_query=True)
    assert set(full.edges) - set(ref.edges) == {"embed->a1.h1<q>"}
    assert ref.details["prev_token_heads"] == "a0.h0" and ref.details["induction_heads"] == "a1.h1"
    assert set(ref.nodes) == {"embed", "a0.h0", "a1.h1", "logits"}


def test_induction_reference_needs_heads():
    model = PatternModel()
    with pytest.raises(ValueError, match="no previous-token head"):
        induction_reference(model, min_score=1.5, n=2, half=6)
