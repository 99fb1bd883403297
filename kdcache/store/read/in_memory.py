"""The feed's in-memory mode, for a store that fits its memory budget: every chunk decoded once,
up front (on the decoding threads), and any order of indices served at memory speed."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kdcache.store.read.residency import Residency, SlotTable
from kdcache.store.read.shared_table import SharedTable, store_identity

__all__ = [
    "LOAD_BLOCK_CHUNKS",
    "InMemory",
]

#: Chunks decoded per read request when the whole store is loaded (big contiguous reads are
#: zarr's fast path); kdcache.store.tools.verify reads in blocks of the same size.
LOAD_BLOCK_CHUNKS = 64


class InMemory(Residency):
    """Every chunk decoded once, up front; any order of indices is served at memory speed."""

    name = "memory"

    @staticmethod
    def capacity(feed: SlotTable) -> int:
        return feed.num_chunks

    def load(self, *, shared: bool) -> None:
        feed = self.feed
        if feed._tables is not None:
            return
        if shared:
            reader = feed.reader
            feed._shared = SharedTable.open(
                store_identity(reader.where, reader.metadata, reader.content_digest()),
                feed._layout,
                feed.num_samples,
                self._check_and_decode_all,
            )
            feed._tables = feed._shared.arrays
        else:
            feed._allocate(feed.num_samples)
            assert feed._tables is not None
            self._decode_all(feed._tables)

    def _check_and_decode_all(self, tables: dict[str, np.ndarray]) -> None:
        for name in self.feed._layout:
            self.feed.reader.check_chunks_present(name)
        self._decode_all(tables)

    def _decode_all(self, tables: dict[str, np.ndarray]) -> None:
        feed = self.feed
        # Each thread decodes its own blocks, so about LOAD_BLOCK_CHUNKS chunks are in flight.
        block_chunks = max(1, LOAD_BLOCK_CHUNKS // feed.decode_threads)
        block_rows = feed.chunk_rows * block_chunks

        def decode_block(start: int) -> None:
            stop = min(start + block_rows, feed.num_samples)
            for name, table in tables.items():
                feed.reader.read_rows_into(name, start, stop, table[start:stop])

        feed.decoder.run_all(decode_block, range(0, feed.num_samples, block_rows))
        try:
            feed.reader.check_unchanged()  # every row above came from the store that was opened
        except Exception:
            feed._tables = None
            raise
        feed._chunks_decoded += feed.num_chunks

    def pieces(self, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        self.feed.load()
        yield slice(0, rows.size), rows

    def epoch_order(
        self,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        return np.array_split(rng.permutation(self.feed.num_samples), world_size)[rank]
