"""Chunks decoded on a few threads, ahead of the batches that need them, and the epoch plans
that say which chunks come next.

Decoding a chunk is mostly zstd decompression, crc32c, the sha256 digest check and copies, all of
which release the GIL, so a few threads decode chunks in parallel with each other and with the
thread that gathers batches; against a remote store (S3) the threads keep several requests in
flight instead of one.

Forking while another thread is inside a zarr read can deadlock the child (see the project's
zarr notes), so before this process forks every decoder waits for the chunks it has in flight,
and a forked child starts its own threads when it first needs them.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LOCAL_DECODE_THREADS",
    "PLANS_KEPT",
    "ChunkDecoder",
    "EpochPlan",
    "default_decode_threads",
]

#: Chunks a feed decodes at once from local files: one per core, since decoding is CPU work
#: (on 2 cores, 4 or 8 threads were slower than 2).
LOCAL_DECODE_THREADS = os.cpu_count() or 1
#: Chunks a feed fetches and decodes at once from a remote store (S3, HTTP), whose requests mostly
#: wait on the server: against a local S3 server on 2 cores, 8 beat 4 and 16.
_REMOTE_DECODE_THREADS = 8
#: Epoch plans a feed remembers (the epoch being read, the next one, and one spare).
PLANS_KEPT = 3


def default_decode_threads(*, remote: bool) -> int:
    """Chunks decoded at once by default, from a remote store or from local files."""
    return _REMOTE_DECODE_THREADS if remote else LOCAL_DECODE_THREADS


class ChunkDecoder:
    """Runs ``decode(chunk, slot)`` on ``threads`` threads; the caller keeps the books.

    Only the thread that submits looks at :attr:`pending`; the workers only decode.
    """

    def __init__(self, decode: Callable[[int, int], None], threads: int) -> None:
        self._decode = decode
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        #: Chunk -> (slot, its decode in flight or finished but not yet collected).
        self.pending: dict[int, tuple[int, Future[None]]] = {}
        _DECODERS.add(self)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kdcache-decode")
        return self._pool

    def submit(self, chunk: int, slot: int) -> None:
        self.pending[chunk] = (slot, self._executor().submit(self._decode, chunk, slot))

    def run_all(self, task: Callable[[int], None], items: Iterable[int]) -> None:
        """``task(item)`` for every item on the threads; raises the first error once all ended."""
        futures = [self._executor().submit(task, item) for item in items]
        wait(futures)
        for future in futures:
            future.result()

    def finished(self) -> list[int]:
        """The pending chunks whose decode has ended (successfully or not)."""
        return [chunk for chunk, (_, future) in list(self.pending.items()) if future.done()]

    def collect(self, chunk: int) -> BaseException | None:
        """Wait for ``chunk``'s decode, forget it, and return its error (``None`` if it worked)."""
        _, future = self.pending.pop(chunk)
        return future.exception()

    def quiesce(self) -> None:
        """Wait until no decode is running (results stay pending, to be collected)."""
        wait([future for _, future in list(self.pending.values())])

    def forget_threads(self) -> None:
        """In a forked child: the parent's threads do not exist here."""
        self._pool = None


_DECODERS: weakref.WeakSet[ChunkDecoder] = weakref.WeakSet()


def _before_fork() -> None:
    for decoder in list(_DECODERS):
        decoder.quiesce()


def _after_fork_in_child() -> None:
    for decoder in list(_DECODERS):
        decoder.forget_threads()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@dataclass
class EpochPlan:
    """The chunks of one epoch's order, window by window (see ``LogitFeed.epoch_order``)."""

    windows: list[np.ndarray]
    #: The window of each chunk of the store, -1 for a chunk outside this rank's share.
    window_of_chunk: np.ndarray
    #: Rows of a full window.
    window_rows: int
    #: The latest window a batch read from.
    current: int = field(default=-1)

    @classmethod
    def of(cls, windows: list[np.ndarray], num_chunks: int, window_rows: int) -> EpochPlan:
        window_of_chunk = np.full(num_chunks, -1, dtype=np.int64)
        for index, chunks in enumerate(windows):
            window_of_chunk[chunks] = index
        return cls(windows, window_of_chunk, window_rows)

    def follows(self, chunks: np.ndarray, rows: int, *, fresh: bool) -> bool:
        """Whether a batch of ``rows`` rows from ``chunks`` reads this plan in order: its chunks
        lie in the few consecutive windows so many rows can span, at or after :attr:`current`
        (anywhere for a ``fresh`` start). A random-order batch spans far more windows."""
        windows = self.window_of_chunk[chunks]
        if windows.size == 0 or windows.min() < 0:
            return False
        low, high = int(windows.min()), int(windows.max())
        if high - low > rows // self.window_rows + 1:
            return False
        return fresh or low >= self.current

    def advance(self, chunks: np.ndarray) -> None:
        self.current = int(self.window_of_chunk[chunks].max())

    def ahead(self) -> list[np.ndarray]:
        """The chunks to hold now: the current window's and the next one's."""
        return self.windows[self.current : self.current + 2]
