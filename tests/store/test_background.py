"""The background dump writer on real stores: same bytes as a direct write, errors surface,
resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import create_store, open_store
from kdcache.errors import InvalidLogitsError
from kdcache.store.background import BackgroundWriter


def random_logits(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_samples, num_classes)).astype(np.float32)


def test_background_writes_equal_direct_writes(tmp_path):
    logits = random_logits(95, 4)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=95, num_classes=4, encoding="float32", chunk_rows=10
    )
    order = np.random.default_rng(2).permutation(95)
    with BackgroundWriter(writer, max_pending=2) as background:
        for batch in np.array_split(order, 12):
            block = torch.from_numpy(logits[batch])
            background.write(torch.from_numpy(batch), block)
            block.zero_()  # the caller may reuse its buffers at once
    writer.finalize()
    np.testing.assert_array_equal(
        open_store(tmp_path / "s.zarr").read(np.arange(95)).numpy(), logits
    )


def test_a_background_error_surfaces_in_the_caller_and_the_dump_resumes(tmp_path):
    logits = random_logits(40, 3)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=40, num_classes=3, encoding="float32", chunk_rows=10
    )
    bad = logits[20:30].copy()
    bad[4, 1] = np.inf
    with pytest.raises(InvalidLogitsError, match="samples 24"):
        with BackgroundWriter(writer) as background:
            background.write(np.arange(20), logits[:20])
            background.write(np.arange(20, 30), bad)
            background.write(np.arange(30, 40), logits[30:])
    writer.close()  # what the dump's process exiting does: the lock is freed
    resumed = create_store(
        tmp_path / "s.zarr",
        num_samples=40,
        num_classes=3,
        encoding="float32",
        chunk_rows=10,
        resume=True,
    )
    assert (
        resumed.pending_indices().min() >= 20
    )  # the chunks written before the error stayed durable
    with BackgroundWriter(resumed) as background:
        pending = resumed.pending_indices()
        background.write(pending, logits[pending])
    resumed.finalize()
    np.testing.assert_array_equal(
        open_store(tmp_path / "s.zarr").read(np.arange(40)).numpy(), logits
    )


def test_the_callers_own_error_wins_and_queued_chunks_are_kept(tmp_path):
    writer = create_store(
        tmp_path / "s.zarr", num_samples=30, num_classes=2, encoding="float32", chunk_rows=10
    )
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(writer) as background:
            background.write(np.arange(10), random_logits(10, 2))
            raise KeyboardInterrupt
    writer.close()
    reopened = create_store(
        tmp_path / "s.zarr",
        num_samples=30,
        num_classes=2,
        encoding="float32",
        chunk_rows=10,
        resume=True,
    )
    np.testing.assert_array_equal(reopened.pending_indices(), np.arange(10, 30))
