"""Progress on stderr wherever a user waits: a redrawn tqdm bar on a terminal; in logs and pipes,
where a redrawn bar would be one endless line, a whole line every ``KDCACHE_PROGRESS_SECONDS``
(default 30) once a phase has run that long, so short runs and their one-line errors stay clean.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

#: Seconds between two progress lines when stderr is not a terminal.
DEFAULT_LINE_SECONDS = 30.0

log = logging.getLogger("kdcache")


def _line_seconds() -> float:
    text = os.environ.get("KDCACHE_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_LINE_SECONDS
    except ValueError:
        return DEFAULT_LINE_SECONDS


def _on_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the job


class _Lines(tqdm):
    """A tqdm that prints each update as a whole line (and nothing when it closes)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # closing: a line-by-line log has nothing to clear
            return False
        self.fp.write((msg if msg is not None else self.__str__()) + "\n")
        self.fp.flush()
        return True


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str,
    leave: bool = True,
    **options: Any,
) -> tqdm:
    """A progress bar over ``iterable`` (or ``total`` units updated by hand) counting ``unit``s.

    On a terminal: tqdm's bar. Otherwise, when kdcache logs at INFO level (the CLI without
    ``--quiet``) on rank 0: periodic lines; else nothing."""
    if _on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **options)
    seconds = _line_seconds()
    return _Lines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        file=sys.stderr,
        ascii=True,
        mininterval=seconds,
        delay=seconds,
        disable=not (log.isEnabledFor(logging.INFO) and _is_main_rank()),
        **options,
    )


def announce(message: str) -> None:
    """Say on a terminal that a command has started work (imports, datasets, models take a while
    before the first bar); logs and pipes get their first line from :func:`progress`."""
    if _on_terminal() and log.isEnabledFor(logging.INFO) and _is_main_rank():
        log.info(message)
