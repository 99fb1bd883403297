"""Counts in messages: ``1 epoch``, ``2 epochs``, never ``1 epochs`` or ``2 epoch(s)``."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` followed by ``noun``, or by its plural (``noun + "s"`` unless given) if not 1."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
