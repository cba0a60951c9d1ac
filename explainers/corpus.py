"""Corpora for the activation store: deterministic, iterable sequences of documents (texts or token lists).

A corpus is any object with ``name``, ``describe() -> dict`` (JSON-able, recorded in the store's manifest, free
of timestamps so reruns compare equal) and ``__iter__`` yielding documents in a fixed order, each a ``str`` (the
store tokenizes it with the model's tokenizer) or a sequence of token ids. This module knows nothing of tasks or
models: ``evals/cli_sae.py`` builds a :class:`TextsCorpus` from a zoo task generator.

- :class:`TextsCorpus` / :class:`TokensCorpus`: in-memory documents;
- :class:`TextFileCorpus`: a UTF-8 text file, one document per line, per blank-line-separated paragraph, or
  the whole file;
- :class:`JsonlCorpus`: one JSON object per line with a text field (or a list of token ids); bad lines are
  one-line errors naming ``file:line``;
- :class:`HFDatasetCorpus`: a HuggingFace dataset, streamed (needs the ``datasets`` package and a reachable hub
  or a filled cache);
- :class:`FortunesCorpus`: the offline English corpus for real models (``smollm2-135m``): Debian's ``fortunes``
  files (``/usr/share/games/fortunes``, ``apt-get install fortunes``), one fortune per document. See
  ``docs/store.md`` for why this one.

:func:`corpus_from_spec` parses the command line's ``--corpus`` forms.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

FORTUNES_DIR = "/usr/share/games/fortunes"

Document = str | Sequence[int]


@runtime_checkable
class Corpus(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def __iter__(self) -> Iterator[Document]: ...


def _sha256_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TextsCorpus:
    """Documents given as strings (e.g. a task generator's prompts)."""

    name: str
    texts: tuple[str, ...]
    source: str = ""

    def describe(self) -> dict[str, Any]:
        return {"kind": "texts", "name": self.name, "source": self.source, "documents": len(self.texts),
                "sha256": _sha256_texts(self.texts)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)


@dataclass(frozen=True)
class TokensCorpus:
    """Documents given as token-id lists (BOS is added by the store, not here)."""

    name: str
    documents: tuple[tuple[int, ...], ...]

    def describe(self) -> dict[str, Any]:
        return {"kind": "tokens", "name": self.name, "documents": len(self.documents),
                "sha256": _sha256_texts(",".join(map(str, d)) for d in self.documents)}

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.documents)


@dataclass(frozen=True)
class TextFileCorpus:
    """A UTF-8 text file split into documents by ``unit``: ``line``, ``paragraph`` (blank-line separated) or
    ``file``. Empty documents are skipped."""

    path: str
    unit: str = "paragraph"

    def __post_init__(self) -> None:
        if self.unit not in ("line", "paragraph", "file"):
            raise ValueError(f"TextFileCorpus: unit {self.unit!r} unknown; one of line, paragraph, file")
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"corpus file {self.path} not found")

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> dict[str, Any]:
        return {"kind": "text-file", "name": self.name, "path": str(Path(self.path).resolve()), "unit": self.unit,
                "sha256": _sha256_file(Path(self.path))}

    def __iter__(self) -> Iterator[str]:
        text = Path(self.path).read_text(encoding="utf-8")
        if self.unit == "file":
            parts: Iterable[str] = [text]
        elif self.unit == "line":
            parts = text.splitlines()
        else:
            parts = _paragraphs(text.splitlines())
        return (p for p in (s.strip() for s in parts) if p)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line.rstrip())
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


@dataclass(frozen=True)
class JsonlCorpus:
    """One JSON object per line; ``field`` holds the text (a string) or the token ids (a list of ints)."""

    path: str
    field: str = "text"

    def __post_init__(self) -> None:
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"corpus file {self.path} not found")

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> dict[str, Any]:
        return {"kind": "jsonl", "name": self.name, "path": str(Path(self.path).resolve()), "field": self.field,
                "sha256": _sha256_file(Path(self.path))}

    def __iter__(self) -> Iterator[Document]:
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{i}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: bad JSON ({e.msg})") from None
                if not isinstance(obj, dict) or self.field not in obj:
                    raise ValueError(f"{where}: no field {self.field!r}")
                v = obj[self.field]
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                    yield tuple(v)
                else:
                    raise ValueError(f"{where}: field {self.field!r} must be a string or a list of token ids")


@dataclass(frozen=True)
class HFDatasetCorpus:
    """A HuggingFace dataset streamed in its stored order (``datasets.load_dataset(..., streaming=True)``)."""

    dataset: str
    split: str = "train"
    field: str = "text"
    config: str | None = None

    @property
    def name(self) -> str:
        return self.dataset

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf-dataset", "name": self.dataset, "config": self.config, "split": self.split,
                "field": self.field}

    def __iter__(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ImportError("HF dataset corpora need the datasets package (pip install datasets)") from None
        ds = datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        for i, row in enumerate(ds):
            if self.field not in row:
                raise ValueError(f"HF dataset {self.dataset} row {i}: no field {self.field!r} "
                                 f"(fields: {', '.join(row)})")
            yield str(row[self.field])


@dataclass(frozen=True)
class FortunesCorpus:
    """Debian's fortune files: every plain fortune file in ``directory`` (sorted by name; the ``.dat`` indexes,
    ``.u8`` copies and the ``exclude``d files skipped: by default ``ascii-art``, which is pictures, and
    ``translate-me``, which is not English), split at lines holding a single ``%``; one fortune per document."""

    directory: str = FORTUNES_DIR
    exclude: tuple[str, ...] = ("ascii-art", "translate-me")

    def __post_init__(self) -> None:
        if not self.files():
            raise FileNotFoundError(f"no fortune files in {self.directory} (on Debian: apt-get install fortunes)")

    @property
    def name(self) -> str:
        return "fortunes"

    def files(self) -> list[Path]:
        d = Path(self.directory)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()
                      and p.name not in self.exclude)

    def describe(self) -> dict[str, Any]:
        files = self.files()
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(_sha256_file(p).encode())
        return {"kind": "fortunes", "name": "fortunes", "directory": self.directory, "exclude": list(self.exclude),
                "files": [p.name for p in files], "sha256": h.hexdigest()}

    def __iter__(self) -> Iterator[str]:
        for p in self.files():
            text = p.read_text(encoding="utf-8", errors="replace")
            buf: list[str] = []
            for line in text.splitlines():
                if line.strip() == "%":
                    if buf and "".join(buf).strip():
                        yield "\n".join(buf).strip()
                    buf = []
                else:
                    buf.append(line.rstrip())
            if buf and "".join(buf).strip():
                yield "\n".join(buf).strip()


def corpus_from_spec(spec: str) -> Corpus:
    """``fortunes[:DIR]``, ``hf:NAME[:SPLIT[:FIELD]]``, ``PATH.jsonl[#FIELD]``, ``file:PATH`` or a text ``PATH``
    (``#line`` / ``#paragraph`` / ``#file`` picks the unit; default paragraph). Task corpora (``task:NAME``)
    are built by the CLI, which may import the task generators."""
    if spec == "fortunes" or spec.startswith("fortunes:"):
        return FortunesCorpus(spec.split(":", 1)[1] if ":" in spec else FORTUNES_DIR)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0]:
            raise ValueError(f"corpus {spec!r}: expected hf:NAME[:SPLIT[:FIELD]]")
        return HFDatasetCorpus(parts[0], *(parts[1:3]))
    path, _, opt = spec.removeprefix("file:").partition("#")
    if not os.path.exists(path):
        raise ValueError(f"corpus {spec!r}: not fortunes, hf:NAME, task:NAME or an existing file")
    if path.endswith(".jsonl"):
        return JsonlCorpus(path, opt or "text")
    return TextFileCorpus(path, opt or "paragraph")
