"""A small float32 store whose rows name themselves (row i holds i, i+0.5, i+1, ...), so that a
row served in the wrong place is visible; the feed's tests read it in both modes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from narrowing import logit_feed

from kdcache import create_store, open_store
from kdcache.store.read.logit_feed import LogitFeed

NUM_SAMPLES, NUM_CLASSES, CHUNK_ROWS = 203, 6, 10
ROW_BYTES = NUM_CLASSES * 4  # float32


def logits_for(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Logits that name their own row: row i is i, i+0.5, i+1, ... so a mix-up is visible."""
    indices = np.asarray(indices, dtype=np.float32).reshape(-1, 1)
    return indices + 0.5 * np.arange(NUM_CLASSES, dtype=np.float32)


def write_named_store(path: Path) -> Path:
    writer = create_store(
        path,
        num_samples=NUM_SAMPLES,
        num_classes=NUM_CLASSES,
        encoding="float32",
        chunk_rows=CHUNK_ROWS,
    )
    for batch in np.array_split(np.arange(NUM_SAMPLES), 7):
        writer.write(batch, logits_for(batch))
    writer.finalize()
    return path


def chunked_feed(store: Path, chunks: int = 4) -> LogitFeed:
    """The store's feed in chunked mode with room for ``chunks`` chunks."""
    feed = logit_feed(open_store(store, memory_budget=chunks * CHUNK_ROWS * ROW_BYTES).feed)
    assert feed.mode == "chunked"
    assert feed.capacity == chunks
    return feed
