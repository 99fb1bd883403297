"""A writer for one rank of a multi-process dump whose lock another process of the job holds.

Rank 0 of a torchrun job creates (or resumes) the store with
:func:`kdcache.store.write.writer.create_store` and keeps the single-writer lock for the whole job;
the other ranks join that store with :func:`join_writer` once rank 0 says it is ready.
Every rank writes only whole chunks it owns (see kdcache.distributed), so no chunk object is
ever written by two processes, and only rank 0 finalizes (the group's ``zarr.json`` is
read-modify-write).
"""

from __future__ import annotations

import zarr

from kdcache.errors import StoreError
from kdcache.store.format.layout import WRITTEN_ARRAY, StoreLike, read_metadata
from kdcache.store.format.location import parse_location, zarr_store
from kdcache.store.write.durability import ChunkSync
from kdcache.store.write.writer import StoreWriter

__all__ = [
    "join_writer",
]


def join_writer(path: StoreLike, *, fsync: bool = True) -> StoreWriter:
    """A lock-less writer for the unfinished store at ``path`` that a cooperating process locked.

    Only for a process whose writes the lock holder coordinates (the ranks of one dump job):
    write the chunks you own, then ``close()``; never ``finalize()``.
    """
    location = parse_location(path)
    group = zarr.open_group(zarr_store(location, read_only=False), mode="r+")
    metadata = read_metadata(group, location.text)
    if metadata.complete or WRITTEN_ARRAY not in group:
        raise StoreError(
            f"{location.text} is not an unfinished dump ready for more writers; rank 0 of the job "
            "creates it first: launch every rank with the same command"
        )
    return StoreWriter(
        group, metadata, location.text, sync=ChunkSync.for_location(location, enabled=fsync)
    )
