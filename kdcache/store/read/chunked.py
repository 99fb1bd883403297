"""The feed's chunked mode, for a store larger than its memory budget: a bounded
least-recently-used set of decoded chunks, and the prefetch that follows the epoch order.

Read in the order of :meth:`~kdcache.store.read.logit_feed.LogitFeed.epoch_order` (chunks
shuffled, rows shuffled within a window of chunks, a new order each epoch, every index exactly
once), each chunk is decompressed once per epoch and the table never exceeds the budget, whatever
N is. While a batch reads window w, the decoding threads (kdcache.store.read.decoding) fill
window w + 1's chunks into the slots window w - 1 left: the prefetch depth is one window, half
the table. Random-order reads prefetch nothing and decode the chunks they touch.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

from kdcache.errors import ConfigError
from kdcache.store.read.decoding import PLANS_KEPT, EpochPlan
from kdcache.store.read.residency import Residency, SlotTable

__all__ = [
    "Chunked",
]


class Chunked(Residency):
    """A bounded least-recently-used set of chunks, read best in the feed's epoch order. It
    keeps the books of the feed's slots: which chunk each holds, and which are still decoding."""

    name = "chunked"

    def __init__(self, feed: SlotTable) -> None:
        super().__init__(feed)
        self._slot_of_chunk = np.full(feed.num_chunks, -1, dtype=np.int64)
        self._chunk_of_slot = np.full(feed.capacity, -1, dtype=np.int64)
        self._last_used = np.full(feed.capacity, -1, dtype=np.int64)
        #: Slots whose chunk is still being decoded (or decoded but not yet checked).
        self._decoding = np.zeros(feed.capacity, dtype=bool)
        #: Slots decoded since the store was last seen unchanged (see _check_unchanged).
        self._unchecked = np.zeros(feed.capacity, dtype=bool)
        self._tick = 0
        self._plans: dict[tuple[int, int, int, int], EpochPlan] = {}
        self._plan: EpochPlan | None = None

    @staticmethod
    def capacity(feed: SlotTable) -> int:
        capacity = min(feed.num_chunks, feed.memory_budget // feed.chunk_nbytes)
        if capacity < 2:
            raise ConfigError(
                f"cache memory {feed.memory_budget:,} bytes holds fewer than two of "
                f"{feed.reader.where}'s {feed.chunk_nbytes:,}-byte chunks; raise --cache-memory "
                f"to at least {2 * feed.chunk_nbytes:,} bytes"
            )
        return capacity

    def load(self, *, shared: bool) -> None:
        """The slots, allocated and their pages mapped now, for the whole run (chunks are decoded
        when a batch first needs them). The first touch of fresh memory costs more than the
        decode into it on a virtual machine (7 ms per MB here, docs/benchmarks.md): paid once,
        here, rather than by the first epoch's decoding threads."""
        feed = self.feed
        if feed._tables is not None:
            return
        feed._allocate(feed.capacity * feed.chunk_rows)
        assert feed._tables is not None
        for table in feed._tables.values():
            table.reshape(-1).view(np.uint8)[:: mmap.PAGESIZE] = 0

    def pieces(self, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        feed = self.feed
        if feed._tables is None:
            feed._allocate(feed.capacity * feed.chunk_rows)
        chunks = rows // feed.chunk_rows
        touched = np.unique(chunks)
        if touched.size <= feed.capacity:
            yield slice(0, rows.size), self._resident_positions(rows, chunks, touched)
            return
        # Pieces of at most `capacity` rows touch at most `capacity` chunks, so they always fit.
        for start in range(0, rows.size, feed.capacity):
            span = slice(start, min(start + feed.capacity, rows.size))
            piece = chunks[span]
            yield span, self._resident_positions(rows[span], piece, np.unique(piece))

    def epoch_order(
        self,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        feed = self.feed
        chunks = rng.permutation(feed.num_chunks)[rank::world_size]
        windows = [
            chunks[first : first + feed.window_chunks]
            for first in range(0, len(chunks), feed.window_chunks)
        ]
        parts = [np.empty(0, dtype=np.int64)]  # a rank may own no chunk when there are few
        for window in windows:
            rows = np.concatenate(
                [
                    np.arange(c * feed.chunk_rows, min((c + 1) * feed.chunk_rows, feed.num_samples))
                    for c in window
                ]
            )
            parts.append(rng.permutation(rows))
        self._remember(key, windows)
        return np.concatenate(parts)

    def _remember(self, key: tuple[int, int, int, int], windows: list[np.ndarray]) -> None:
        """Keep the order's windows, so that reading in this order decodes the next one ahead."""
        feed = self.feed
        with feed._lock:
            self._plans.pop(key, None)
            self._plans[key] = EpochPlan.of(
                windows, feed.num_chunks, feed.window_chunks * feed.chunk_rows
            )
            while len(self._plans) > PLANS_KEPT:
                del self._plans[next(iter(self._plans))]

    def _resident_positions(
        self, rows: np.ndarray, chunks: np.ndarray, touched: np.ndarray
    ) -> np.ndarray:
        """Make ``touched``, the chunks of ``rows`` (``chunks``, at most the feed's capacity of
        them), resident, start decoding the windows ahead, and return the rows' positions in the
        table."""
        self._tick += 1
        self._collect_finished()
        self._request(touched, protected=touched, needed=True)
        plan = self._follow_plan(touched, rows.size)
        if plan is not None:
            ahead = plan.ahead()
            protected = np.concatenate([touched, *ahead])
            for window in ahead:
                self._request(window, protected=protected, needed=False)
        self._collect(touched)
        if self._unchecked[self._slot_of_chunk[touched]].any():
            self._check_unchanged()
        return self._slot_of_chunk[chunks] * self.feed.chunk_rows + rows % self.feed.chunk_rows

    def _follow_plan(self, touched: np.ndarray, rows: int) -> EpochPlan | None:
        """The epoch plan these rows read in order (the one read so far, or one that starts
        here), else ``None``: random-order reads decode only what they touch."""
        plan = self._plan
        if plan is None or not plan.follows(touched, rows, fresh=False):
            plan = next(
                (
                    candidate
                    for candidate in reversed(self._plans.values())
                    if candidate.follows(touched, rows, fresh=True)
                ),
                None,
            )
            self._plan = plan
        if plan is not None:
            plan.advance(touched)
        return plan

    def _request(self, chunks: np.ndarray, *, protected: np.ndarray, needed: bool) -> None:
        """Start decoding those of ``chunks`` not resident, into slots holding none of
        ``protected``; ``needed`` chunks always get a slot, others only a free one."""
        slots = self._slot_of_chunk[chunks]
        self._last_used[slots[slots >= 0]] = self._tick
        missing = chunks[slots < 0]
        if not missing.size:
            return
        victims = self._victims(missing.size, protected)
        if needed and victims.size < missing.size:
            self._collect(np.asarray(list(self.feed.decoder.pending), dtype=np.int64), needed=False)
            victims = self._victims(missing.size, protected)
        for chunk, slot in zip(missing.tolist(), victims.tolist(), strict=False):
            evicted = self._chunk_of_slot[slot]
            if evicted >= 0:
                self._slot_of_chunk[evicted] = -1
            self._slot_of_chunk[chunk] = slot
            self._chunk_of_slot[slot] = chunk
            self._last_used[slot] = self._tick
            self._decoding[slot] = True
            self.feed.decoder.submit(chunk, slot)

    def _victims(self, count: int, protected: np.ndarray) -> np.ndarray:
        """Up to ``count`` slots to decode into: least recently used first, none still decoding
        and none holding a ``protected`` chunk."""
        free = ~self._decoding & ~np.isin(self._chunk_of_slot, protected)
        candidates = np.flatnonzero(free)
        order = np.argsort(self._last_used[candidates], kind="stable")
        return candidates[order[:count]]

    def _collect_finished(self) -> None:
        """Take in the decodes that ended in the background (their slots become evictable)."""
        finished = self.feed.decoder.finished() if self.feed._decoder is not None else []
        if finished:
            self._collect(np.asarray(finished, dtype=np.int64), needed=False)

    def _collect(self, chunks: np.ndarray, *, needed: bool = True) -> None:
        """Wait for the decodes of ``chunks`` in flight and take them in, unchecked.

        A ``needed`` chunk that failed to decode raises its error; a chunk decoded ahead that
        failed is forgotten, to be decoded again (and raise) if a batch needs it.
        """
        pending = self.feed._decoder.pending if self.feed._decoder is not None else {}
        collected: list[int] = []
        failed: list[int] = []
        error: BaseException | None = None
        for chunk in chunks.tolist():
            if chunk not in pending:
                continue
            problem = self.feed.decoder.collect(chunk)
            (failed if problem is not None else collected).append(chunk)
            if problem is not None and needed and error is None:
                error = problem
        self._forget(failed)
        slots = self._slot_of_chunk[collected]
        self._decoding[slots] = False
        self._unchecked[slots] = True
        self.feed._chunks_decoded += len(collected)
        if error is not None:
            raise error

    def _check_unchanged(self) -> None:
        """Before serving rows of chunks decoded since the last check: the store is still the
        one opened. One check covers every chunk decoded before it, so a window of prefetched
        chunks costs one check (one request on a remote store), not one per chunk or batch."""
        try:
            self.feed.reader.check_unchanged()
        except Exception:
            # never serve rows that may come from another store
            self._forget(self._chunk_of_slot[self._unchecked].tolist())
            raise
        self._unchecked[:] = False

    def _forget(self, chunks: list[int]) -> None:
        slots = self._slot_of_chunk[chunks]
        self._decoding[slots] = False
        self._unchecked[slots] = False
        self._chunk_of_slot[slots] = -1
        self._last_used[slots] = -1
        self._slot_of_chunk[chunks] = -1
