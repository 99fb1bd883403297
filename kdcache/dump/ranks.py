"""A dump by the K ranks of a torchrun job: one store, each rank writing the whole chunks that
:mod:`kdcache.store.ranks.partition` gives it, under rank 0's writer lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdcache.distributed import RankSession
from kdcache.store.ranks.joining import join_writer
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.writer import StoreWriter


def open_rank_writer(
    session: RankSession, create: Callable[..., StoreWriter], path: str, **options: Any
) -> StoreWriter:
    """``create(path, **options)`` on rank 0 (it takes the lock); the other ranks then join it.

    With one process this is just ``create(path, **options)``.
    """
    writer = session.on_main(lambda: create(path, **options))
    if writer is not None:
        return writer
    return join_writer(path, fsync=options.get("fsync", True))


def finalize_ranks(session: RankSession, writer: StoreWriter) -> None:
    """Once every rank has written its chunks, rank 0 finalizes the store; others let go.

    Rank 0 keeps its writer lock alive while it waits, and records the fidelity measured over
    all ranks' rows. A replacement (``--overwrite``) is swapped in only once it verifies.
    """
    if not session.is_distributed:
        writer.finalize(verify=verify_replacement)
        return
    session.barrier(while_waiting=writer.keep_lock if session.is_main else None)
    # Every measured row's KL (at most ~65k rows in all): the recorded fidelity is then the
    # same whatever the number of ranks.
    parts = session.all_gather(writer.fidelity.parts())
    if session.is_main:
        for rank, other in enumerate(parts):
            if rank != session.info.rank:
                writer.fidelity.add_parts(other)
    else:
        writer.close()
    session.on_main(lambda: writer.finalize(verify=verify_replacement))


def verify_replacement(folder: Path) -> None:
    """Everything ``kdcache verify`` checks, on a replacement whose every row is written, before
    it is marked complete and swapped in."""
    verify_store(folder, finishing=True).raise_if_bad()
