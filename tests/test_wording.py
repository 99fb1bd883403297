"""Counts in messages read as English."""

from __future__ import annotations

from kdcache.wording import counted


def test_one_is_singular_and_every_other_count_plural():
    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert counted(1, "CUDA device") == "1 CUDA device"
    assert counted(3, "entry", "entries") == "3 entries"
