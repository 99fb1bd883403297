"""Which decoded chunks a :class:`~kdcache.store.read.logit_feed.LogitFeed` keeps in RAM: the
strategy behind its ``mode`` (kdcache.store.read.in_memory, kdcache.store.read.chunked)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from kdcache.logits.encodings import Layout
    from kdcache.store.read.decoding import ChunkDecoder
    from kdcache.store.read.feed import RowSource
    from kdcache.store.read.shared_table import SharedTable

__all__ = [
    "Residency",
    "SlotTable",
]


class SlotTable(Protocol):
    """What a residency uses of its feed (a LogitFeed, which imports the residencies): the
    store's sizes, the table of slots and the threads that decode into it."""

    reader: RowSource
    num_samples: int
    num_chunks: int
    chunk_rows: int
    chunk_nbytes: int
    memory_budget: int
    decode_threads: int
    capacity: int
    window_chunks: int
    _layout: Layout
    _tables: dict[str, np.ndarray] | None
    _shared: SharedTable | None
    _chunks_decoded: int
    _decoder: ChunkDecoder | None
    _lock: threading.Lock

    @property
    def decoder(self) -> ChunkDecoder: ...

    def load(self, *, shared: bool = False) -> None: ...

    def _allocate(self, rows: int) -> None: ...


class Residency(ABC):
    """One feed's residency: made by the feed, for the feed, and holding what it needs to know
    of the chunks in the feed's table."""

    #: The mode's name, as ``LogitFeed(mode=...)`` takes it.
    name: ClassVar[str]

    def __init__(self, feed: SlotTable) -> None:
        self.feed = feed

    @staticmethod
    @abstractmethod
    def capacity(feed: SlotTable) -> int:
        """Chunk slots of the feed's table."""

    @abstractmethod
    def load(self, *, shared: bool) -> None:
        """Decode up front what the feed keeps for the whole run."""

    @abstractmethod
    def pieces(self, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """``rows`` in pieces: each piece's span in ``rows`` and its positions in the feed's
        tables, valid until the next piece is asked for."""

    @abstractmethod
    def epoch_order(
        self,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        """Rank ``rank``'s share of one epoch's order of every row, drawn from ``rng``."""
