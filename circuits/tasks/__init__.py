"""Tasks: prompt-pair generators, JSONL loading and validation.

``TASKS[name](n=..., seed=..., tokenizer=None) -> Task`` for the generators ``induction``, ``ioi``,
``greater_than`` and ``dyck`` (deterministic given the seed); :func:`load_jsonl` reads a task file;
:func:`get_task` resolves either; :func:`validate` checks a task against a model's tokenizer.

Without a tokenizer the generators write prompts for the zoo's word-level tokenizer (its lists). Given a
model's tokenizer they write prompts for it: words filtered to one token, pairs of equal token length,
task variants where the tokenizer demands (greater-than on digit-by-digit tokenizers, spaced brackets),
or a one-line refusal (:mod:`circuits.tasks.lexicon`). For the zoo tokenizer both give the same tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from circuits.tasks.base import PromptPair, Task
from circuits.tasks.dyck import dyck
from circuits.tasks.greater_than import greater_than
from circuits.tasks.induction import induction
from circuits.tasks.ioi import ioi
from circuits.tasks.jsonl import load_jsonl, validate

TASKS: dict[str, Callable[..., Task]] = {
    "induction": induction,
    "ioi": ioi,
    "greater_than": greater_than,
    "dyck": dyck,
}


def describe(name: str) -> str:
    """First line of a generator's docstring."""
    return (TASKS[name].__doc__ or "").strip().splitlines()[0]


def get_task(name_or_path: str | Path, n: int = 64, seed: int = 0, metric: str | None = None,
             tokenizer: Any | None = None) -> Task:
    """A generated task (``TASKS`` name, ``n`` pairs from ``seed``) or a ``.jsonl`` file's task.

    ``metric`` overrides the task's default metric. ``n`` and ``seed`` do not apply to files. ``tokenizer``
    (a model's tokenizer): generators write prompts for it; a file's task is validated against it (one-line
    ``file:line`` errors). ``None``: the zoo's prompts; files unchecked until ``Task.batch``.
    """
    key = str(name_or_path)
    if key in TASKS:
        task = TASKS[key](n=n, seed=seed, tokenizer=tokenizer)
        if metric is not None and metric != task.metric:
            task = Task(name=task.name, pairs=task.pairs, metric=metric, source=task.source)
        return task
    if key.endswith(".jsonl") or Path(key).is_file():
        task = load_jsonl(key, metric=metric)
        if tokenizer is not None:
            validate(task, tokenizer)
        return task
    raise ValueError(f"unknown task {key!r}: give one of {sorted(TASKS)} or a .jsonl file")


__all__ = ["TASKS", "Task", "PromptPair", "get_task", "load_jsonl", "validate", "describe",
           "induction", "ioi", "greater_than", "dyck"]
