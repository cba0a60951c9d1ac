"""Tasks from JSON Lines files, and validation of a task against a tokenizer.

Format: one JSON object per line with exactly the string keys ``clean``, ``corrupt``, ``answer`` and
``wrong`` (and optionally ``metric``, which must then agree on every line that gives it)::

    {"clean": "When Mary and John went to the store, John gave a drink to", "corrupt": "...",
     "answer": " Mary", "wrong": " John", "metric": "logit_diff"}

Blank lines are allowed (they are not data). Every other problem is a one-line ``ValueError`` naming
``file:line`` and the reason; nothing is dropped. Problems that depend on the model's tokenizer (clean
and corrupt of unequal token length, multi-token or unknown answers, words outside the vocabulary)
are found by :func:`validate` / ``Task.batch``, which name ``file:line`` through ``Task.sources``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from circuits.tasks.base import PromptPair, Task, encode
from patching.metrics import METRICS

REQUIRED_KEYS = ("clean", "corrupt", "answer", "wrong")
OPTIONAL_KEYS = ("metric",)


def _parse_line(where: str, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(REQUIRED_KEYS)}, "
                         f"got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}")
    extra = sorted(k for k in obj if k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if extra:
        raise ValueError(f"{where}: unexpected key(s) {extra}; allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    for k in (*REQUIRED_KEYS, *(k for k in OPTIONAL_KEYS if k in obj)):
        if not isinstance(obj[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__} {obj[k]!r}")
        if not obj[k].strip():
            raise ValueError(f"{where}: {k!r} is empty")
    if "metric" in obj and obj["metric"] not in METRICS:
        raise ValueError(f"{where}: unknown metric {obj['metric']!r}; choose one of {sorted(METRICS)}")
    return obj


def load_jsonl(path: str | Path, metric: str | None = None, name: str | None = None) -> Task:
    """Read a task from a JSON Lines file (format above).

    Args:
        path: the ``.jsonl`` file.
        metric: metric name; overrides the file's ``metric`` key. Default: the file's, else ``logit_diff``.
        name: task name; default the file's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    pairs: list[PromptPair] = []
    sources: list[str] = []
    file_metric: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        obj = _parse_line(where, line)
        if "metric" in obj:
            if file_metric is not None and obj["metric"] != file_metric:
                raise ValueError(f"{where}: metric {obj['metric']!r} conflicts with {file_metric!r} given earlier")
            file_metric = obj["metric"]
        pairs.append(PromptPair(clean=obj["clean"], corrupt=obj["corrupt"], answer=obj["answer"],
                                wrong=obj["wrong"]))
        sources.append(where)
    if not pairs:
        raise ValueError(f"{path}: empty file; expected one JSON object per line with keys {list(REQUIRED_KEYS)}")
    chosen = metric or file_metric or "logit_diff"
    if chosen not in METRICS:
        raise ValueError(f"{path}: unknown metric {chosen!r}; choose one of {sorted(METRICS)}")
    return Task(name=name or path.stem, pairs=tuple(pairs), metric=chosen, source=str(path),
                sources=tuple(sources))


def _unknown_words(tokenizer: Any, text: str) -> list[str]:
    """Substrings of ``text`` that the tokenizer maps to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return ["?"] if unk in encode(tokenizer, text, prepend_bos=False) else []
    return [text[a:b].strip() for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            if i == unk]


def validate(task: Task, tokenizer: Any) -> None:
    """Check that ``task`` tokenizes cleanly for ``tokenizer``; raise a one-line ``ValueError`` naming the pair.

    Checks, for every pair: no word of the clean or corrupted prompt is unknown to the tokenizer, clean and
    corrupt have the same number of tokens, and answer and wrong are each exactly one known token.
    """
    for i, p in enumerate(task.pairs):
        for field in ("clean", "corrupt"):
            unknown = _unknown_words(tokenizer, getattr(p, field))
            if unknown:
                raise ValueError(f"{task.where(i)}: {field} prompt has word(s) not in the model's vocabulary: "
                                 f"{unknown[:5]}")
    task.batch(tokenizer, "cpu")
