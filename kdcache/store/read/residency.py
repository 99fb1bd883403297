"""Which decoded chunks a :class:`~kdcache.store.read.logit_feed.LogitFeed` keeps in RAM: the
strategy behind its ``mode`` (kdcache.store.read.in_memory, kdcache.store.read.chunked)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from kdcache.store.read.logit_feed import LogitFeed

__all__ = [
    "Residency",
]


class Residency(ABC):
    """One feed's residency: made by the feed, for the feed, and holding what it needs to know
    of the chunks in the feed's table."""

    #: The mode's name, as ``LogitFeed(mode=...)`` takes it.
    name: ClassVar[str]

    def __init__(self, feed: LogitFeed) -> None:
        self.feed = feed

    @staticmethod
    @abstractmethod
    def capacity(feed: LogitFeed) -> int:
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
