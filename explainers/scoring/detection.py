"""Detection scoring (Paulo et al. 2024, delphi's ``DetectionScorer``).

The scorer LLM reads the explanation and a batch of held-out texts and says, for each, whether it shows
the explained feature (a Python list of 0/1, prompt ``detection-v1``). A record is a positive when its
largest activation reaches ``rel_threshold`` times the largest over the held-out records
(:func:`~explainers.scoring.base.positive_threshold`); the score is the balanced accuracy of the answers
(metric ``balanced_accuracy``). Records are shuffled (seeded by ``seed`` and the unit) before batching, so
positives and negatives mix in every batch. A batch whose reply does not parse after the client's attempts
is left out (``meta["failed_batches"]``).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Sequence

from explainers.llm import prompts
from explainers.llm.client import LLMClient, chat_text
from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, register, split_labels


def record_text(r: ActivationRecord) -> str:
    return "".join(prompts.render_token(t) for t in r.tokens)


def unit_rng(seed: int, unit: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{unit}".encode()).hexdigest()[:16], 16))


async def ask_batches(client: LLMClient, items: Sequence[tuple[str, int, str]], batch_size: int, fmt: str,
                      make_messages: Callable[[str, Sequence[str]], list[dict[str, str]]], explanation: str,
                      max_tokens: int) -> tuple[list[int], list[int], list[str], dict[str, str]]:
    """Ask about ``items`` (text, label, record id) in batches; (predictions, labels, ids, failed batches)."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    async def ask(batch: Sequence[tuple[str, int, str]]):
        n = len(batch)
        return await client.chat(make_messages(explanation, [t for t, _, _ in batch]), fmt=fmt,
                                 parse=lambda reply: prompts.parse_binary_list(chat_text(reply), n),
                                 max_tokens=max_tokens)

    replies = await asyncio.gather(*(ask(b) for b in batches))
    preds, labels, ids, failed = [], [], [], {}
    for k, (batch, reply) in enumerate(zip(batches, replies, strict=True)):
        if not reply.ok:
            failed[str(k)] = str(reply.failed)
            continue
        preds.extend(reply.value)
        labels.extend(label for _, label, _ in batch)
        ids.extend(rid for _, _, rid in batch)
    return preds, labels, ids, failed


@register
class DetectionScorer(Scorer):
    """delphi's detection: which held-out texts show the feature? See the module docstring."""

    name = "detection"
    metric = "balanced_accuracy"
    needs_llm = True

    def __init__(self, client: LLMClient, *, batch_size: int = 5, rel_threshold: float = 0.5, seed: int = 0,
                 max_tokens: int = 32):
        if batch_size < 1:
            raise ValueError(f"detection batch_size must be >= 1, got {batch_size}")
        self.client, self.batch_size, self.rel_threshold, self.seed = client, batch_size, rel_threshold, seed
        self.max_tokens = max_tokens

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        assert explanation.text is not None
        try:
            labels = split_labels(held_out, self.rel_threshold)
        except ValueError as e:  # no active record: nothing to tell apart
            return self.failure(explanation, str(e))
        items = [(record_text(r), y, r.id) for r, y in zip(held_out, labels, strict=True)]
        unit_rng(self.seed, explanation.unit).shuffle(items)
        preds, ys, ids, failed = await ask_batches(self.client, items, self.batch_size, prompts.FORMATS["detection"],
                                                   prompts.detection_messages, explanation.text, self.max_tokens)
        meta = {"format": prompts.FORMATS["detection"], "model": self.client.model, "failed_batches": failed,
                "positives": sum(labels), "negatives": len(labels) - sum(labels)}
        if not preds:
            return self.failure(explanation, f"every detection batch failed: {next(iter(failed.values()))}", **meta)
        return self.output(explanation, [[p] for p in preds], [[y] for y in ys], ids, **meta)
