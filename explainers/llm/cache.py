"""The one on-disk cache every LLM call goes through (stdlib ``sqlite3``).

A row per reply, keyed by the SHA-256 of the canonical JSON of (endpoint model, request kind, prompt or
messages, sampling parameters, prompt-format version, attempt). Rows are written as each reply arrives (one
short transaction each), so a run killed at any point loses at most the replies still in flight, and a rerun
or resumed run pays only for what is missing. The database is in WAL mode with a busy timeout: two processes
can read and write it at once (SQLite serialises the writers; ``INSERT OR IGNORE`` keeps the first of two
identical rows). Only valid replies are stored; transport errors (429, 5xx, timeouts) never are.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    format TEXT NOT NULL,
    request TEXT NOT NULL,
    reply TEXT NOT NULL,
    created REAL NOT NULL
)"""


def default_cache_path() -> Path:
    """``$CIRCUITEXPLAIN_CACHE/llm/cache.sqlite`` (default cache root ``~/.cache/circuitexplain``)."""
    root = Path(os.environ.get("CIRCUITEXPLAIN_CACHE", Path.home() / ".cache" / "circuitexplain"))
    return root.expanduser() / "llm" / "cache.sqlite"


def request_key(request: Mapping[str, Any]) -> str:
    """SHA-256 of the request's canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class LLMCache:
    """``get(request) -> reply | None`` and ``put(request, reply)`` over one SQLite file.

    ``request`` must hold ``model`` and ``format`` (and everything else that changes the reply); ``reply`` is
    the endpoint's JSON reply as a dict. Use from one thread (the asyncio loop); other processes may share
    the file."""

    def __init__(self, path: str | os.PathLike | None = None, *, timeout_s: float = 60.0):
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"LLM cache {self.path}: not a usable SQLite database ({e})") from e

    def get(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (request_key(request),)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, request: Mapping[str, Any], reply: Mapping[str, Any]) -> None:
        for field in ("model", "format"):
            if field not in request:
                raise ValueError(f"LLM cache request without {field!r}: {sorted(request)}")
        self._db.execute(
            "INSERT OR IGNORE INTO replies (key, model, format, request, reply, created) VALUES (?, ?, ?, ?, ?, ?)",
            (request_key(request), str(request["model"]), str(request["format"]),
             json.dumps(request, sort_keys=True, ensure_ascii=False), json.dumps(reply, ensure_ascii=False),
             time.time()))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LLMCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
