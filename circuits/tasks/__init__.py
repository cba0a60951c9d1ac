"""Tasks: prompt-pair generators, JSONL loading and validation.

``TASKS[name](n=..., seed=...) -> Task`` for the generators ``induction``, ``ioi``, ``greater_than`` and
``dyck`` (deterministic given the seed); :func:`load_jsonl` reads a task file; :func:`get_task` resolves
either; :func:`validate` checks a task against a model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def get_task(name_or_path: str | Path, n: int = 64, seed: int = 0, metric: str | None = None) -> Task:
    """A generated task (``TASKS`` name, ``n`` pairs from ``seed``) or a ``.jsonl`` file's task.

    ``metric`` overrides the task's default metric. ``n`` and ``seed`` do not apply to files.
    """
    key = str(name_or_path)
    if key in TASKS:
        task = TASKS[key](n=n, seed=seed)
        if metric is not None and metric != task.metric:
            task = Task(name=task.name, pairs=task.pairs, metric=metric, source=task.source)
        return task
    if key.endswith(".jsonl") or Path(key).is_file():
        return load_jsonl(key, metric=metric)
    raise ValueError(f"unknown task {key!r}: give one of {sorted(TASKS)} or a .jsonl file")


__all__ = ["TASKS", "Task", "PromptPair", "get_task", "load_jsonl", "validate", "describe",
           "induction", "ioi", "greater_than", "dyck"]
