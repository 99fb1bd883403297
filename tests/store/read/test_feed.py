"""The logit feed on real stores: the mode a budget picks, order, pairing, sizes and worker
safety (not speed); the chunked mode's own guarantees are in test_chunked.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from named_rows import (
    CHUNK_ROWS,
    NUM_SAMPLES,
    ROW_BYTES,
    logits_for,
    write_named_store,
)
from narrowing import dense, logit_feed
from torch.utils.data import DataLoader, Dataset

from kdcache import create_store, open_store
from kdcache.data.loaders import make_loader
from kdcache.errors import ConfigError
from kdcache.store.read.feed import parse_size


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_named_store(tmp_path_factory.mktemp("feed") / "s.zarr")


def test_a_store_that_fits_is_served_from_memory(store):
    feed = logit_feed(open_store(store).feed)
    assert feed.mode == "memory"
    indices = np.random.default_rng(0).integers(0, NUM_SAMPLES, size=50)
    np.testing.assert_array_equal(dense(feed.read(indices)).numpy(), logits_for(indices))
    assert feed.chunks_decoded == feed.num_chunks == 21


@pytest.mark.parametrize("mode", ["memory", "chunked"])
def test_every_index_exactly_once_per_epoch_in_a_new_order(store, mode):
    feed = open_store(
        store, memory_budget=None if mode == "memory" else 4 * CHUNK_ROWS * ROW_BYTES
    ).feed
    assert feed.mode == mode
    orders = [feed.epoch_order(epoch, seed=3) for epoch in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(NUM_SAMPLES))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(orders[0], feed.epoch_order(0, seed=3))
    assert not np.array_equal(orders[0], feed.epoch_order(0, seed=4))


def test_budget_below_two_chunks_and_bad_indices_are_refused(store):
    with pytest.raises(
        ConfigError,
        match=f"; raise --cache-memory to at least {2 * CHUNK_ROWS * ROW_BYTES:,} bytes",
    ):
        open_store(store, memory_budget=CHUNK_ROWS * ROW_BYTES).read([0])
    with pytest.raises(ConfigError, match=r"\[0, 203\)"):
        open_store(store).read([0, 203])


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("2048", 2048),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("3 kib", 3072),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "0", "-5MB"])
def test_parse_size_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="8GiB"):
        parse_size(text)


class RowIdentity(Dataset):
    """Inputs that are the logits the store holds for the same row, so pairing can be checked."""

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(logits_for([index])[0]), 0


@pytest.mark.parametrize("mode", ["memory", "chunked"])
def test_logits_stay_paired_with_inputs_under_shuffling_and_workers(store, mode):
    feed = open_store(
        store, memory_budget=None if mode == "memory" else 4 * CHUNK_ROWS * ROW_BYTES
    ).feed
    feed.load()  # a loaded table inherited by forked workers must not disturb anything
    sampler = feed.sampler(seed=5) if mode == "chunked" else None
    loader = make_loader(
        RowIdentity(),
        batch_size=16,
        num_workers=2,
        device=torch.device("cpu"),
        shuffle=True,
        seed=5,
        sampler=sampler,
    )
    for _ in range(2):
        seen = []
        for inputs, _, indices in loader:
            torch.testing.assert_close(dense(feed.read(indices)), inputs, rtol=0, atol=0)
            seen.append(indices)
        assert sorted(torch.cat(seen).tolist()) == list(range(NUM_SAMPLES))
    if sampler is not None:
        assert sampler.epoch == 2


class ReaderDataset(Dataset):
    """Reads teacher logits inside DataLoader workers, as an API user might."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.reader.read([index])[0], index


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_reader_used_inside_workers_reads_the_right_rows(store, context):
    reader = open_store(store, memory_budget=4 * CHUNK_ROWS * ROW_BYTES)
    reader.read([0, 100])  # the parent has open handles and decoded chunks before workers start
    loader = DataLoader(
        ReaderDataset(reader),
        batch_size=32,
        shuffle=True,
        num_workers=1,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(0),
    )
    for logits, indices in loader:
        np.testing.assert_array_equal(logits.numpy(), logits_for(indices.numpy()))


def test_a_pickled_reader_travels_without_its_table(store):
    reader = open_store(store)
    reader.load()
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.feed.resident_nbytes == 0
    np.testing.assert_array_equal(copy.read([7, 3]).numpy(), logits_for([7, 3]))


@pytest.fixture(scope="module")
def wide_float16_store(tmp_path_factory):
    """float16 rows wider than one conversion block, so a batch takes several."""
    path = tmp_path_factory.mktemp("feed16") / "s.zarr"
    values = np.random.default_rng(2).standard_normal((60, 9000), dtype=np.float32) * 4
    writer = create_store(path, num_samples=60, num_classes=9000, encoding="float16", chunk_rows=8)
    writer.write(np.arange(60), values)
    writer.finalize()
    return path, values.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("budget", [None, 4 * 8 * 9000 * 2])
def test_float16_rows_reach_float32_exactly(wide_float16_store, budget):
    path, stored = wide_float16_store
    reader = open_store(path, memory_budget=budget)
    assert reader.feed.mode == ("memory" if budget is None else "chunked")
    rows = np.random.default_rng(3).permutation(60)[:21]
    np.testing.assert_array_equal(dense(reader.read(rows)).numpy(), stored[rows])
    np.testing.assert_array_equal(reader.read_dense(rows).numpy(), stored[rows])
    np.testing.assert_array_equal(reader.feed.gather(rows)["logits"], stored[rows])
