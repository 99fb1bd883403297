"""The writer refuses what it cannot store, in one line naming what it was given, on real stores.

Whatever a caller hands :meth:`StoreWriter.write`, it is either refused with a
:class:`KdcacheError` or stored so that it reads back within the encoding's error: a store is
never finalized holding a row its own readers would refuse.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from narrowing import dense

from kdcache import create_store, open_store
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    KdcacheError,
    StoreCorruptError,
    StoreIncompleteError,
)
from kdcache.logits.sparse import SparseLogits
from kdcache.store.tools.verify import verify_store

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("encoding", "row"),
    [
        ("float16", [1e5, 0.0, 1.0, 2.0]),  # beyond float16's 65504
        ("topk:2", [1e5, -1e5, 0.0, 1.0]),  # an offset from the row max beyond float16
        ("int8", [-F32_MAX, F32_MAX, 0.0, 1.0]),  # a row range beyond float32
    ],
)
def test_values_that_overflow_the_encoding_are_refused_and_the_store_stays_resumable(
    tmp_path, encoding, row
):
    store = tmp_path / "s.zarr"
    writer = create_store(store, num_samples=4, num_classes=4, chunk_rows=2, encoding=encoding)
    good = np.arange(8, dtype=np.float32).reshape(2, 4)
    writer.write([0, 1], good)
    with pytest.raises(InvalidLogitsError, match=f"samples 3 overflow the encoding {encoding}"):
        writer.write([2, 3], np.stack([good[0], row]))
    with pytest.raises(StoreIncompleteError):
        writer.finalize()
    writer.close()
    with pytest.raises(StoreIncompleteError, match="1 of 2 chunks"):
        open_store(store)
    assert verify_store(store).problems[0].startswith("unfinished dump")


def test_the_largest_values_an_encoding_holds_are_stored(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=2, num_classes=3, encoding="float16")
    writer.write([0, 1], np.array([[65504.0, -65504.0, 0.0], [1.0, 2.0, 3.0]]))
    writer.finalize()
    assert dense(open_store(tmp_path / "s.zarr").read([0]))[0].tolist() == [65504, -65504, 0]


def test_logits_beyond_float32_are_refused_as_non_finite(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=2, num_classes=2, encoding="float32")
    with pytest.raises(
        InvalidLogitsError, match=r"NaN or Inf for samples 1; .* beyond float32's range"
    ):
        writer.write([0, 1], np.array([[0.0, 1.0], [1e300, 0.0]]))


@pytest.mark.parametrize(
    ("indices", "given"),
    [
        ([0.0, 1.0], "float64 values such as [0.0, 1.0]"),
        (np.array([0.5, 1.0], dtype=np.float32), "float32 values such as [0.5, 1.0]"),
        (torch.tensor([0.0, 1.0]), "float32 values"),
        ([True, False], "bool values"),
        (["0", "1"], "<U1 values"),
    ],
)
def test_row_indices_that_are_not_integers_are_refused_not_truncated(tmp_path, indices, given):
    writer = create_store(tmp_path / "s.zarr", num_samples=2, num_classes=2, chunk_rows=1)
    with pytest.raises(InvalidLogitsError, match=re.escape(f"must be integers, got {given}")):
        writer.write(indices, np.ones((2, 2)))
    assert writer.pending_indices().tolist() == [0, 1]


def test_row_indices_beyond_int64_are_refused_as_out_of_range(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=2, num_classes=2)
    with pytest.raises(InvalidLogitsError, match=r"\[0, 2\), got values from 0 to 18446744"):
        writer.write(np.array([0, 2**64 - 1], dtype=np.uint64), np.ones((2, 2)))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 3], r"lie in \[0, 3\) \(the store's classes\), got 3 for samples 2"),
        ([0, -1, 2], r"got -1 for samples 1"),
        ([0.0, 1.5, 2.0], "integer class indices, got float64 values such as"),
        ([0, 1], "expected 3 labels, got 2"),
    ],
)
def test_labels_a_reader_would_refuse_are_refused_before_anything_is_written(
    tmp_path, labels, message
):
    with pytest.raises(ConfigError, match=message):
        create_store(tmp_path / "s.zarr", num_samples=3, num_classes=3, labels=labels)
    assert not (tmp_path / "s.zarr").exists()


def verify_replacement(folder: Path) -> None:
    verify_store(folder, finishing=True).raise_if_bad()


def small_store(path: Path, value: float, *, overwrite: bool = False) -> None:
    writer = create_store(
        path, num_samples=4, num_classes=2, chunk_rows=2, encoding="float32", overwrite=overwrite
    )
    writer.write(np.arange(4), np.full((4, 2), value))
    writer.finalize(verify=verify_replacement)


def test_overwrite_swaps_in_a_replacement_only_once_it_verifies(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store, 1.0)
    writer = create_store(
        store, num_samples=4, num_classes=2, chunk_rows=2, encoding="float32", overwrite=True
    )
    writer.write(np.arange(4), np.full((4, 2), 2.0))
    # Damage the replacement after it was written, as a failing disk or another process could.
    chunk = tmp_path / "s.zarr.incoming" / "logits" / "c" / "1" / "0"
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    with pytest.raises(StoreCorruptError, match=r"s.zarr was not replaced: .*samples 2-3") as error:
        writer.finalize(verify=verify_replacement)
    assert "\n" not in str(error.value)
    assert dense(open_store(store).read([0, 3])).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]  # lock released too
    small_store(store, 3.0, overwrite=True)  # a replacement that verifies is swapped in
    assert dense(open_store(store).read([3])).tolist() == [[3.0, 3.0]]


def test_a_replacement_interrupted_while_it_is_verified_stays_resumable(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store, 1.0)

    def interrupted(folder: Path) -> None:
        assert not verify_store(folder).ok  # not marked complete while it is being verified
        raise KeyboardInterrupt

    for finish in ("resume", "overwrite"):
        writer = create_store(
            store, num_samples=4, num_classes=2, chunk_rows=2, encoding="float32", overwrite=True
        )
        writer.write(np.arange(4), np.full((4, 2), 2.0))
        with pytest.raises(KeyboardInterrupt):
            writer.finalize(verify=interrupted)
        writer.close()
        assert dense(open_store(store).read([0])).tolist() == [[1.0, 1.0]]
        again = create_store(
            store,
            num_samples=4,
            num_classes=2,
            chunk_rows=2,
            encoding="float32",
            resume=finish == "resume",
            overwrite=finish == "overwrite",
        )
        if finish == "overwrite":
            again.write(np.arange(4), np.full((4, 2), 2.0))
        again.finalize(verify=verify_replacement)
        assert dense(open_store(store).read([0])).tolist() == [[2.0, 2.0]]
        small_store(store, 1.0, overwrite=True)


#: Values a teacher could hand the writer: ordinary, at and beyond each encoding's limits.
VALUES = st.one_of(
    st.floats(-20, 20, width=32),
    st.sampled_from(
        [np.nan, np.inf, -np.inf, 65504.0, 65520.0, -1e5, 1e5, 3e38, -3e38, F32_MAX, 1e-45]
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    encoding=st.sampled_from(["float32", "float16", "int8", "topk:2"]),
    logits=arrays(np.float32, st.tuples(st.integers(1, 4), st.just(4)), elements=VALUES),
)
# A row of a subnormal and zeros: topk values are rebuilt from the row's top value, so a
# difference below float32's smallest subnormal rounds to it (found by CI's fuzzing).
@example(encoding="topk:2", logits=np.array([[1e-45, 0.0, 0.0, 0.0]], np.float32))
def test_any_logits_are_refused_or_read_back_within_the_encodings_error(encoding, logits):
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "s.zarr"
        writer = create_store(store, num_samples=len(logits), num_classes=4, encoding=encoding)
        refused: str | None = None
        try:
            writer.write(np.arange(len(logits)), logits)
        except KdcacheError as error:
            refused = str(error)
        if refused is not None:
            assert "\n" not in refused
            writer.close()
            return
        writer.finalize()
        assert verify_store(store).ok
        read = open_store(store).read(np.arange(len(logits)))
        wide = logits.astype(np.float64)
        if isinstance(read, SparseLogits):  # topk: the K largest values of every row
            expected = -np.sort(-wide, axis=1)[:, :2]
            got = read.values.double().numpy()
            allowed = (
                np.abs(expected - expected[:, :1]) * 2**-10
                + np.abs(expected) * 2**-22
                + np.finfo(np.float32).smallest_subnormal
            )
        else:
            got = read.double().numpy()
            expected = wide
            if encoding == "int8":
                spread = wide.max(axis=1, keepdims=True) - wide.min(axis=1, keepdims=True)
                allowed = (
                    spread / 510 * 1.01 + np.abs(wide).max(axis=1, keepdims=True) * 2**-21 + 6e-8
                )
            else:
                allowed = np.abs(wide) * (2**-11 if encoding == "float16" else 0.0) + 6e-8
        assert np.all(np.abs(got - expected) <= allowed), (got, expected)


@settings(max_examples=25, deadline=None)
@given(
    indices=arrays(
        st.sampled_from([np.int64, np.uint64, np.int8, np.float64, np.float16, np.bool_]),
        st.integers(1, 3),
    )
)
def test_any_row_indices_are_refused_or_name_exactly_the_rows_written(indices):
    with tempfile.TemporaryDirectory() as folder:
        writer = create_store(Path(folder) / "s.zarr", num_samples=4, num_classes=2, chunk_rows=1)
        refused: str | None = None
        try:
            writer.write(indices, np.ones((len(indices), 2)))
        except KdcacheError as error:
            refused = str(error)
        writer.close()
        if refused is not None:
            assert "\n" not in refused
            return
        assert indices.dtype.kind in "iu"
        written = set(range(4)) - set(writer.pending_indices().tolist())
        assert written == {int(index) for index in indices}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.zeros(3, dtype=np.int64)}, "array name 'labels' is taken by the store"),
        ({"logits": np.zeros(3, dtype=np.int64)}, "array name 'logits' is taken by the store"),
        ({"offsets": np.array([0.0, 1.5])}, "array 'offsets' must hold integers, got float64"),
    ],
)
def test_further_arrays_with_a_taken_name_or_non_integer_values_are_refused(
    tmp_path, arrays, message
):
    with pytest.raises(ConfigError, match=message):
        create_store(tmp_path / "s.zarr", num_samples=3, num_classes=3, arrays=arrays)
    assert not (tmp_path / "s.zarr").exists()
