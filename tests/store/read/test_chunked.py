"""The chunked feed on a real store: each chunk decoded once per epoch within its budget, the
next window decoded ahead, and DDP ranks reading disjoint shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from named_rows import (
    CHUNK_ROWS,
    NUM_CLASSES,
    NUM_SAMPLES,
    ROW_BYTES,
    chunked_feed,
    logits_for,
    write_named_store,
)
from narrowing import dense

from kdcache.store.read.chunked import Chunked


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_named_store(tmp_path_factory.mktemp("chunked") / "s.zarr")


def test_chunked_order_shuffles_rows_within_windows_of_chunks(store):
    feed = chunked_feed(store, chunks=6)
    order = feed.epoch_order(0)
    window_rows = feed.window_chunks * CHUNK_ROWS
    first = order[:window_rows]
    assert len(np.unique(first // CHUNK_ROWS)) == feed.window_chunks == 3
    assert not np.array_equal(first, np.sort(first))  # rows are shuffled, not in chunk order


def test_chunked_feed_decodes_each_chunk_once_per_epoch_within_its_budget(store):
    feed = chunked_feed(store, chunks=4)
    for epoch in range(2):
        order = feed.epoch_order(epoch)
        for start in range(0, NUM_SAMPLES, 16):
            batch = order[start : start + 16]
            np.testing.assert_array_equal(dense(feed.read(batch)).numpy(), logits_for(batch))
            assert feed.resident_nbytes <= feed.memory_budget
        assert feed.chunks_decoded == (epoch + 1) * feed.num_chunks


def test_a_loaded_chunked_feed_holds_its_slots_within_its_budget_and_decodes_nothing(store):
    feed = chunked_feed(store, chunks=4)
    feed.load()
    assert feed.resident_nbytes == 4 * CHUNK_ROWS * ROW_BYTES <= feed.memory_budget
    assert feed.chunks_decoded == 0
    np.testing.assert_array_equal(dense(feed.read([5, 57])).numpy(), logits_for([5, 57]))


def test_chunked_feed_serves_any_indices_even_more_chunks_than_fit(store):
    feed = chunked_feed(store, chunks=2)
    indices = np.random.default_rng(1).permutation(NUM_SAMPLES)[
        :120
    ]  # touches far more than 2 chunks
    np.testing.assert_array_equal(
        dense(feed.read(torch.from_numpy(indices))).numpy(), logits_for(indices)
    )
    assert feed.resident_nbytes <= feed.memory_budget
    assert feed.read([]).shape == (0, NUM_CLASSES)


def test_reading_in_epoch_order_decodes_the_next_window_ahead(store):
    feed = chunked_feed(store, chunks=6)
    order = feed.epoch_order(0, seed=1)
    chunks, first_seen = np.unique(order // CHUNK_ROWS, return_index=True)
    by_window = chunks[np.argsort(first_seen)]  # a window's rows all come before the next's
    next_window = by_window[feed.window_chunks : 2 * feed.window_chunks]
    first = order[:16]
    np.testing.assert_array_equal(dense(feed.read(first)).numpy(), logits_for(first))
    feed.decoder.quiesce()
    assert isinstance(feed.residency, Chunked)
    held = set(feed.residency._chunk_of_slot.tolist())
    assert set(next_window.tolist()) <= held  # decoded before any of its rows was asked for
    # random-order reads are served too, decoding only the chunks they touch
    feed.decoder.quiesce()
    before = feed.chunks_decoded + len(feed.decoder.pending)
    scattered = np.array([5, 195, 101])
    np.testing.assert_array_equal(dense(feed.read(scattered)).numpy(), logits_for(scattered))
    touched = set((scattered // CHUNK_ROWS).tolist()) - held
    assert feed.chunks_decoded + len(feed.decoder.pending) == before + len(touched)


@pytest.mark.parametrize("world_size", [1, 3])
def test_prefetching_ranks_read_disjoint_shares_of_every_row_each_epoch(store, world_size):
    feeds = [chunked_feed(store, chunks=4) for _ in range(world_size)]
    for epoch in range(2):
        shares = []
        for rank, feed in enumerate(feeds):
            decoded = feed.chunks_decoded
            order = feed.epoch_order(epoch, seed=7, rank=rank, world_size=world_size)
            for start in range(0, len(order), 16):
                batch = order[start : start + 16]
                np.testing.assert_array_equal(dense(feed.read(batch)).numpy(), logits_for(batch))
                assert feed.resident_nbytes <= feed.memory_budget
            shares.append(order)
            owned = np.unique(order // CHUNK_ROWS).size
            # each of its chunks once (in a later epoch, one still held from the last needs none)
            assert feed.chunks_decoded - decoded <= owned
            assert epoch > 0 or feed.chunks_decoded == owned
        every = np.concatenate(shares)
        np.testing.assert_array_equal(np.sort(every), np.arange(NUM_SAMPLES))
