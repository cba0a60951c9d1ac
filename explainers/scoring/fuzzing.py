"""Fuzzing scoring (Paulo et al. 2024, delphi's ``FuzzingScorer``).

Held-out texts are shown with some tokens highlighted ``<<like this>>``; the scorer LLM says for each
whether the highlighted tokens are the ones the explanation describes (a list of 0/1, ``fuzzing-v1``).
Active tokens are those whose activation reaches ``rel_threshold`` times the largest over the held-out
records. Each active record is shown either correctly highlighted (its active tokens; label 1) or fuzzed
(as many tokens highlighted at random among its inactive ones; label 0), chosen by a coin seeded by
``seed`` and the unit; inactive records are shown with random tokens highlighted (label 0). Score: the
balanced accuracy of the answers (metric ``balanced_accuracy``).
"""

from __future__ import annotations

from collections.abc import Sequence

from explainers.llm import prompts
from explainers.llm.client import LLMClient
from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, positive_threshold, register
from explainers.scoring.detection import ask_batches, unit_rng


@register
class FuzzingScorer(Scorer):
    """delphi's fuzzing: are the highlighted tokens the explained ones? See the module docstring."""

    name = "fuzzing"
    metric = "balanced_accuracy"
    needs_llm = True

    def __init__(self, client: LLMClient, *, batch_size: int = 5, rel_threshold: float = 0.5, seed: int = 0,
                 max_tokens: int = 32):
        if batch_size < 1:
            raise ValueError(f"fuzzing batch_size must be >= 1, got {batch_size}")
        self.client, self.batch_size, self.rel_threshold, self.seed = client, batch_size, rel_threshold, seed
        self.max_tokens = max_tokens

    def items(self, unit: str, held_out: Sequence[ActivationRecord]) -> list[tuple[str, int, str]]:
        """(highlighted text, label, record id) for every held-out record, shuffled; deterministic."""
        t = positive_threshold(held_out, self.rel_threshold)
        rng = unit_rng(self.seed, unit)
        out = []
        for r in held_out:
            active = [a >= t for a in r.activations]
            n_active = sum(active)
            if n_active and rng.random() < 0.5:
                out.append((prompts.highlight(r.tokens, active), 1, r.id))
                continue
            pool = [i for i, a in enumerate(active) if not a]
            k = min(max(n_active, 1), len(pool))
            if k == 0:  # every token active: nothing to fuzz, show it correctly highlighted
                out.append((prompts.highlight(r.tokens, active), 1, r.id))
                continue
            chosen = set(rng.sample(pool, k))
            out.append((prompts.highlight(r.tokens, [i in chosen for i in range(len(r.tokens))]), 0, r.id))
        rng.shuffle(out)
        return out

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        assert explanation.text is not None
        try:
            items = self.items(explanation.unit, held_out)
        except ValueError as e:  # no active record: nothing to tell apart
            return self.failure(explanation, str(e))
        preds, ys, ids, failed = await ask_batches(self.client, items, self.batch_size, prompts.FORMATS["fuzzing"],
                                                   prompts.fuzzing_messages, explanation.text, self.max_tokens)
        meta = {"format": prompts.FORMATS["fuzzing"], "model": self.client.model, "failed_batches": failed,
                "correct": sum(y for _, y, _ in items), "fuzzed": sum(1 - y for _, y, _ in items)}
        if not preds:
            return self.failure(explanation, f"every fuzzing batch failed: {next(iter(failed.values()))}", **meta)
        return self.output(explanation, [[p] for p in preds], [[y] for y in ys], ids, **meta)
