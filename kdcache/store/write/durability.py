"""Chunks that survive a power loss: fsync a chunk's files and their folders before its flag.

zarr's LocalStore writes each object to a temporary file and renames it, but never calls
``fsync``: after a power loss (or a kernel crash) a chunk whose written-flag reached the disk may
have lost its bytes, and a resumed dump would trust it. :class:`ChunkSync` flushes a freshly
written chunk's files, then their folders (which hold the renames), before the writer sets the
flag, and flushes the flag and finally the group's ``zarr.json`` the same way. Object stores
(S3 and alike) acknowledge a write only once it is durable, so only local stores need this.
``fsync=False`` (``--no-fsync``) trades that guarantee for speed; `kdcache bench dump` measures
the cost (docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdcache.store.format._zarr_compat import row_chunk_key
from kdcache.store.format.location import StoreLocation

__all__ = [
    "ChunkSync",
    "fsync_path",
]


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkSync:
    """Makes the chunks of a local store durable; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_location(cls, location: StoreLocation, *, enabled: bool) -> ChunkSync | None:
        """A syncer for a local store when ``enabled``; ``None`` where nothing needs syncing."""
        folder = location.folder
        return cls(folder) if enabled and folder is not None else None

    def chunk(self, arrays: Iterable[Any], chunk: int) -> None:
        """fsync row chunk ``chunk`` of every array in ``arrays``, then the folders above it.

        zarr may have just created the chunk's folder (``logits/c/7``), so every folder up to
        the store's root is flushed: each holds the entry of the one below.
        """
        folders: set[Path] = set()
        for array in arrays:
            path = self.root / row_chunk_key(array, chunk)
            fsync_path(path)
            folders.update(p for p in path.parents if p.is_relative_to(self.root))
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_path(folder)

    def metadata(self) -> None:
        """fsync the group's ``zarr.json`` (where ``complete`` lives) and the store's folder."""
        fsync_path(self.root / "zarr.json")
        fsync_path(self.root)
