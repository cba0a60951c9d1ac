"""Where the shipped zoo checkpoints live."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_dir(name: str) -> Path:
    """``circuits/zoo/checkpoints/NAME`` (may not exist yet)."""
    return CHECKPOINTS / name
