"""The background dump writer on real stores: same bytes as a direct write, errors surface,
resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from narrowing import dense, zarr_array

from kdcache import create_store, open_store
from kdcache.errors import ConfigError, InvalidLogitsError
from kdcache.logits.encodings import parse_encoding
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.background import BackgroundWriter


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
        dense(open_store(tmp_path / "s.zarr").read(np.arange(95))).numpy(), logits
    )


def test_rows_handed_over_without_a_copy_are_written_as_given(tmp_path):
    """``copy=False`` (the LM dump's fresh rows): tensors, views of one batch, arrays and lists
    are kept as they are, not copied, and land in the store unchanged."""
    logits = random_logits(40, 4)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=40, num_classes=4, encoding="float32", chunk_rows=10
    )
    batch = torch.from_numpy(logits[:20].copy())
    with BackgroundWriter(writer) as background:
        background.write(np.arange(0, 10), batch[:10], copy=False)
        background.write(np.arange(10, 20), batch[10:], copy=False)
        background.write(np.arange(20, 30), logits[20:30], copy=False)
        background.write(np.arange(30, 40), logits[30:].tolist(), copy=False)
    writer.finalize()
    np.testing.assert_array_equal(
        dense(open_store(tmp_path / "s.zarr").read(np.arange(40))).numpy(), logits
    )


def test_a_background_error_surfaces_in_the_caller_and_the_dump_resumes(tmp_path):
    logits = random_logits(40, 3)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=40, num_classes=3, encoding="float32", chunk_rows=10
    )
    bad = logits[20:30].copy()
    bad[4, 1] = np.inf
    with (
        pytest.raises(InvalidLogitsError, match="samples 24"),
        BackgroundWriter(writer) as background,
    ):
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
        dense(open_store(tmp_path / "s.zarr").read(np.arange(40))).numpy(), logits
    )


def test_the_callers_own_error_wins_and_queued_chunks_are_kept(tmp_path):
    writer = create_store(
        tmp_path / "s.zarr", num_samples=30, num_classes=2, encoding="float32", chunk_rows=10
    )
    with pytest.raises(KeyboardInterrupt), BackgroundWriter(writer) as background:
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


@pytest.mark.parametrize("encoding", ["float16", "int8", "topk:3"])
def test_several_writer_threads_store_the_same_bytes_and_fidelity_as_one(tmp_path, encoding):
    logits = random_logits(300, 12, seed=3)
    order = np.random.default_rng(4).permutation(300)
    stores = {}
    for workers in (1, 3):
        path = tmp_path / f"w{workers}.zarr"
        writer = create_store(
            path, num_samples=300, num_classes=12, encoding=encoding, chunk_rows=16
        )
        with BackgroundWriter(writer, workers=workers) as background:
            assert background.workers == workers
            for batch in np.array_split(order, 23):  # batches straddle chunks
                background.write(batch, logits[batch])
        stores[workers] = writer.finalize()
    one, three = (zarr.open_group(tmp_path / f"w{n}.zarr", mode="r") for n in (1, 3))
    for name in parse_encoding(encoding, num_classes=12).layout(12):
        np.testing.assert_array_equal(zarr_array(one, name)[:], zarr_array(three, name)[:])
    # Exact sums over per-batch parts: the order the threads finished in does not matter.
    assert stores[1].fidelity == stores[3].fidelity
    assert verify_store(tmp_path / "w3.zarr").ok


def test_an_error_in_one_of_several_threads_surfaces_and_the_rest_stays_resumable(tmp_path):
    logits = random_logits(64, 3)
    bad = logits.copy()
    bad[40, 0] = np.nan
    writer = create_store(
        tmp_path / "s.zarr", num_samples=64, num_classes=3, encoding="float32", chunk_rows=8
    )
    with (
        pytest.raises(InvalidLogitsError, match="samples 40"),
        BackgroundWriter(writer, workers=4) as background,
    ):
        for start in range(0, 64, 8):
            background.write(np.arange(start, start + 8), bad[start : start + 8])
    writer.close()
    resumed = create_store(
        tmp_path / "s.zarr",
        num_samples=64,
        num_classes=3,
        encoding="float32",
        chunk_rows=8,
        resume=True,
    )
    pending = resumed.pending_indices()
    assert 40 in pending
    assert len(pending) < 64
    with BackgroundWriter(resumed, workers=2) as background:
        background.write(pending, logits[pending])
    resumed.finalize()
    np.testing.assert_array_equal(
        dense(open_store(tmp_path / "s.zarr").read(np.arange(64))).numpy(), logits
    )


def test_writer_threads_must_be_a_positive_integer(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2)
    with pytest.raises(ConfigError, match="got 0"):
        BackgroundWriter(writer, workers=0)
    writer.close()


def test_rows_reduced_on_the_device_store_the_bytes_of_raw_logits(tmp_path):
    """The reduction runs in torch here on the CPU, as it would on the teacher's GPU."""
    from kdcache.logits.reduced import reduce_rows

    logits = random_logits(60, 5000, seed=4)
    stores = {}
    for way in ("raw", "reduced"):
        writer = create_store(
            tmp_path / f"{way}.zarr", num_samples=60, num_classes=5000, encoding="topk:16"
        )
        with BackgroundWriter(writer, workers=2) as background:
            for batch in np.array_split(np.arange(60), 4):
                block = torch.from_numpy(logits[batch])
                if way == "raw":
                    background.write(batch, block)
                else:
                    measured = batch % writer.fidelity.sample_every == 0
                    background.write_reduced(
                        batch, reduce_rows(block, writer.encoding, measured=measured)
                    )
        stores[way] = writer.finalize()
    raw, reduced = (zarr.open_group(tmp_path / f"{way}.zarr", mode="r") for way in stores)
    for name in ("row_max", "topk_offsets", "topk_indices", "tail"):
        np.testing.assert_array_equal(
            np.asarray(zarr_array(raw, name)[:]), np.asarray(zarr_array(reduced, name)[:])
        )
    assert stores["raw"].fidelity == stores["reduced"].fidelity
    assert stores["raw"].fidelity is not None


def test_rows_drawn_on_the_device_are_stored_as_drawn_with_their_fidelity(tmp_path):
    """sampled:S rows drawn in torch (here on the CPU, as on the teacher's GPU) are stored as the
    draws, whatever batches carried them; the fidelity is measured on the rows that came along."""
    from kdcache.logits.reduced import reduce_rows
    from kdcache.logits.sampled import draw_rows

    logits = random_logits(60, 700, seed=5)
    stores = {}
    for name, batches in (("four", 4), ("seven", 7)):
        writer = create_store(
            tmp_path / f"{name}.zarr", num_samples=60, num_classes=700, encoding="sampled:6"
        )
        with BackgroundWriter(writer, workers=2) as background:
            for batch in np.array_split(np.arange(60)[::-1], batches):
                measured = batch % writer.fidelity.sample_every == 0
                drawn = reduce_rows(
                    torch.from_numpy(logits[batch]), writer.encoding, measured=measured, rows=batch
                )
                background.write_reduced(batch, drawn)
        stores[name] = writer.finalize()
    classes, counts, _ = draw_rows(torch.from_numpy(logits), torch.arange(60), 6)
    for name in stores:
        group = zarr.open_group(tmp_path / f"{name}.zarr", mode="r")
        np.testing.assert_array_equal(np.asarray(zarr_array(group, "sample_indices")[:]), classes)
        np.testing.assert_array_equal(np.asarray(zarr_array(group, "sample_counts")[:]), counts)
        assert verify_store(tmp_path / f"{name}.zarr").ok
    assert stores["four"].fidelity == stores["seven"].fidelity
    assert stores["four"].fidelity is not None


def test_drawn_rows_of_non_finite_logits_are_refused_in_one_line(tmp_path):
    from kdcache.logits.reduced import reduce_rows

    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=50, encoding="sampled:3")
    logits = torch.zeros(4, 50)
    logits[2, 9] = float("inf")
    drawn = reduce_rows(logits, writer.encoding, measured=np.zeros(4, bool), rows=np.arange(4))
    with pytest.raises(InvalidLogitsError, match=r"NaN or Inf for samples 2\b"):
        writer.write_reduced(np.arange(4), drawn)
    assert writer.pending_indices().tolist() == [0, 1, 2, 3]
    writer.close()


@pytest.mark.parametrize(
    ("encoding", "reduced_as", "width", "message"),
    [
        ("float16", "topk:4", 50, "store's encoding float16: write its raw"),
        ("sampled:4", "topk:4", 50, "store's encoding sampled:4: write its raw"),
        ("topk:4", "sampled:4", 50, "store's encoding topk:4: write its raw"),
        ("sampled:4", "sampled:4", 300, r"logits of 300 classes .* store has 50"),
        ("topk:4", "topk:4", 300, r"logits of 300 classes .* store has 50"),
    ],
)
def test_reduced_rows_that_do_not_fit_the_store_are_refused_in_one_line(
    tmp_path, encoding, reduced_as, width, message
):
    """Rows reduced for another encoding, or from logits of another width, store nothing."""
    from kdcache.logits.reduced import reduce_rows

    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=50, encoding=encoding)
    reduced = reduce_rows(
        torch.zeros(4, width),
        parse_encoding(reduced_as, num_classes=50),
        measured=np.zeros(4, bool),
        rows=np.arange(4),
    )
    with pytest.raises(InvalidLogitsError, match=message):
        writer.write_reduced(np.arange(4), reduced)
    assert writer.pending_indices().tolist() == [0, 1, 2, 3]
    writer.close()
