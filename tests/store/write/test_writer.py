"""The store API on real Zarr stores on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from narrowing import dense, kdcache_record, present, zarr_array

from kdcache import create_store, open_store
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    StoreExistsError,
    StoreFormatError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
)
from kdcache.store.format.metadata import FORMAT_VERSION, PLAIN_FORMAT_VERSION


def random_logits(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).normal(size=(num_samples, num_classes)).astype(np.float32) * 3
    )


@pytest.mark.parametrize(("encoding", "tolerance"), [("float32", 0.0), ("float16", 1e-2)])
def test_round_trip_in_any_write_order(tmp_path, encoding, tolerance):
    logits = random_logits(103, 7)
    writer = create_store(
        tmp_path / "s.zarr",
        num_samples=103,
        num_classes=7,
        encoding=encoding,
        chunk_rows=10,
        labels=np.arange(103) % 7,
    )
    order = np.random.default_rng(1).permutation(103)
    for batch in np.array_split(order, 9):
        writer.write(batch, torch.from_numpy(logits[batch]))
    writer.finalize()

    reader = open_store(tmp_path / "s.zarr")
    assert (reader.num_samples, reader.num_classes, reader.metadata.encoding) == (103, 7, encoding)
    indices = [5, 100, 0, 5]
    read = dense(reader.read(indices))
    assert read.dtype == torch.float32
    assert read.shape == (4, 7)
    np.testing.assert_allclose(read.numpy(), logits[indices], atol=tolerance * 10, rtol=tolerance)
    np.testing.assert_array_equal(reader.labels, np.arange(103) % 7)


def test_plain_zarr_reads_row_i_without_kdcache(tmp_path):
    logits = random_logits(20, 3)
    writer = create_store(tmp_path / "s.zarr", num_samples=20, num_classes=3, encoding="float32")
    writer.write(np.arange(20), logits)
    writer.finalize()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    np.testing.assert_array_equal(zarr_array(group, "logits")[7], logits[7])
    # A store without views keeps the version older kdcache releases read.
    assert kdcache_record(group)["format_version"] == PLAIN_FORMAT_VERSION
    assert kdcache_record(group)["complete"] is True


def test_incomplete_store_is_refused_and_finalize_names_missing_rows(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=30, num_classes=2, chunk_rows=10)
    writer.write(np.arange(10), random_logits(10, 2))
    with pytest.raises(StoreIncompleteError, match="10-29"):
        writer.finalize()
    with pytest.raises(StoreIncompleteError, match=r"1 of 3 chunks \(10 of 30 samples, 33%\)"):
        open_store(tmp_path / "s.zarr")
    assert open_store(
        tmp_path / "s.zarr", allow_incomplete=True
    ).written_fraction() == pytest.approx(1 / 3)


def test_resume_continues_only_missing_chunks(tmp_path):
    logits = random_logits(30, 2)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=30, num_classes=2, chunk_rows=10, encoding="float32"
    )
    writer.write(np.arange(15), logits[:15])  # rows 10-14 stay in memory and are lost
    writer.close()  # as if the writer had died
    resumed = create_store(
        tmp_path / "s.zarr",
        num_samples=30,
        num_classes=2,
        chunk_rows=10,
        encoding="float32",
        resume=True,
    )
    np.testing.assert_array_equal(resumed.pending_indices(), np.arange(10, 30))
    resumed.write(np.arange(10, 30), logits[10:])
    resumed.finalize()
    np.testing.assert_array_equal(
        dense(open_store(tmp_path / "s.zarr").read(np.arange(30))).numpy(), logits
    )


def test_resume_with_other_settings_is_refused(tmp_path):
    create_store(tmp_path / "s.zarr", num_samples=30, num_classes=2, chunk_rows=10).close()
    with pytest.raises(StoreMismatchError, match="num_classes"):
        create_store(tmp_path / "s.zarr", num_samples=30, num_classes=3, chunk_rows=10, resume=True)


def test_existing_stores_are_never_clobbered_without_overwrite(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2)
    writer.write(np.arange(4), random_logits(4, 2))
    writer.finalize()
    with pytest.raises(StoreExistsError, match="--overwrite"):
        create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2)
    assert open_store(tmp_path / "s.zarr").metadata.complete
    replaced = create_store(tmp_path / "s.zarr", num_samples=8, num_classes=2, overwrite=True)
    assert replaced.metadata.num_samples == 8

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("not a store")
    with pytest.raises(StoreExistsError, match="not a kdcache store"):
        create_store(tmp_path / "photos", num_samples=4, num_classes=2, overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_text() == "not a store"


def test_an_interrupted_dump_is_refused_naming_the_options_that_continue_or_replace_it(tmp_path):
    create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2).close()
    with pytest.raises(StoreExistsError) as refused:
        create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2)
    assert str(refused.value).endswith(
        "holds an interrupted dump; pass --resume to continue it or --overwrite to start over"
    )


def test_bad_logits_are_refused_with_the_offending_indices(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=10, num_classes=3)
    bad = random_logits(4, 3)
    bad[2, 1] = np.nan
    with pytest.raises(InvalidLogitsError, match="samples 7"):
        writer.write([5, 6, 7, 8], bad)
    with pytest.raises(InvalidLogitsError, match=r"shape \(2, 3\)"):
        writer.write([0, 1], random_logits(2, 4))
    with pytest.raises(InvalidLogitsError, match=r"\[0, 10\)"):
        writer.write([10], random_logits(1, 3))


def test_opening_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreFormatError, match="not a kdcache store"):
        open_store(tmp_path / "folder")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreFormatError, match="not a kdcache store"):
        open_store(tmp_path / "plain.zarr")


def test_newer_format_version_is_refused(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=2, num_classes=2)
    writer.write([0, 1], random_logits(2, 2))
    writer.finalize()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    group.attrs["kdcache"] = {**kdcache_record(group), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(StoreFormatError, match="upgrade kdcache"):
        open_store(tmp_path / "s.zarr")


@pytest.mark.parametrize("encoding", ["int8", "topk:4", "topk:4:8"])
def test_lossy_encodings_round_trip_and_record_their_fidelity(tmp_path, encoding):
    logits = random_logits(64, 12)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=64, num_classes=12, encoding=encoding, chunk_rows=16
    )
    for batch in np.array_split(np.random.default_rng(2).permutation(64), 5):
        writer.write(batch, logits[batch])
    metadata = writer.finalize()
    fidelity = metadata.fidelity
    assert present(fidelity)["temperatures"] == [1.0, 2.0, 4.0, 8.0]
    assert present(fidelity)["num_samples"] == 8
    assert present(writer.fidelity.result()).to_dict() == fidelity
    assert all(kl > 0 for kl in present(fidelity)["mean_kl"])

    reader = open_store(tmp_path / "s.zarr")
    assert reader.metadata.fidelity == fidelity
    for temperature in (1.0, 3.0):
        read = reader.read_dense(np.arange(64), temperature=temperature).numpy()
        assert read.shape == (64, 12)
        assert read.dtype == np.float32
        np.testing.assert_array_equal(read.argmax(axis=1), logits.argmax(axis=1))
    if encoding == "int8":
        np.testing.assert_allclose(read, logits, atol=(logits.max() - logits.min()) / 255)
        with pytest.raises(ConfigError, match="read_sparse needs a topk:K store"):
            reader.read_sparse([0])
    else:
        sparse = reader.read_sparse([5, 0])
        np.testing.assert_array_equal(
            sparse.indices.numpy(), np.argsort(-logits[[5, 0]], axis=1)[:, :4]
        )
        torch.testing.assert_close(sparse.dense(3.0), reader.read_dense([5, 0], temperature=3.0))


def test_a_store_written_before_fidelity_was_recorded_still_opens(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=3)
    writer.write(np.arange(4), random_logits(4, 3))
    writer.finalize()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    group.attrs["kdcache"] = {
        key: value for key, value in kdcache_record(group).items() if key != "fidelity"
    }
    reader = open_store(tmp_path / "s.zarr")
    assert reader.metadata.fidelity is None
    assert reader.read([0]).shape == (1, 3)


def test_topk_store_stays_near_its_raw_payload_on_disk(tmp_path):
    from kdcache.logits.encodings import parse_encoding
    from kdcache.store.format.layout import store_nbytes

    rows, classes = 4096, 1000
    writer = create_store(
        tmp_path / "s.zarr", num_samples=rows, num_classes=classes, encoding="topk:20"
    )
    writer.write(np.arange(rows), random_logits(rows, classes))
    writer.finalize()
    payload = parse_encoding("topk:20").row_nbytes(classes)
    assert payload == 96
    assert present(store_nbytes(tmp_path / "s.zarr")) / rows <= 1.1 * payload


def test_encoded_rows_are_stored_bit_for_bit_and_foreign_ones_refused(tmp_path):
    source = create_store(tmp_path / "a.zarr", num_samples=6, num_classes=5, encoding="sampled:3")
    source.write(np.arange(6), np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32))
    source.finalize()
    reader = open_store(tmp_path / "a.zarr")
    rows = {name: reader.read_rows(name, 0, 6) for name in ("sample_indices", "sample_counts")}
    copy = create_store(tmp_path / "b.zarr", num_samples=6, num_classes=5, encoding="sampled:3")
    with pytest.raises(InvalidLogitsError, match="must hold the arrays"):
        copy.write_encoded(np.arange(6), {"sample_indices": rows["sample_indices"]})
    wrong = {**rows, "sample_counts": rows["sample_counts"].astype(np.int16)}
    with pytest.raises(InvalidLogitsError, match="dtype uint8"):
        copy.write_encoded(np.arange(6), wrong)
    copy.write_encoded(np.arange(5, -1, -1), {name: v[::-1] for name, v in rows.items()})
    copy.finalize()
    copied = open_store(tmp_path / "b.zarr")
    for name, values in rows.items():
        np.testing.assert_array_equal(copied.read_rows(name, 0, 6), values)
    assert copied.metadata.fidelity is None  # no logits passed through the writer


def test_rank_0_finalizes_an_s3_store_whose_missing_chunks_another_process_wrote(
    tmp_path, s3_bucket
):
    """The torchrun case where rank 0 has no chunk left to write on resume: its client listed the
    store's flags when it opened it, another rank wrote the missing chunks since, and finalize must
    see them (s3fs answered "no such key" from its listing, a missing flag reads as 0)."""
    import s3fs

    from kdcache.store.ranks.joining import join_writer

    url = f"{s3_bucket}/t.zarr"
    first = create_store(url, num_samples=4, num_classes=3, chunk_rows=2)
    first.write([0, 1], np.zeros((2, 3), np.float32))
    first.close()
    resumed = create_store(url, num_samples=4, num_classes=3, chunk_rows=2, resume=True)
    assert resumed.pending_indices().tolist() == [2, 3]
    s3fs.S3FileSystem.clear_instance_cache()  # another process: another client
    other = join_writer(url)
    other.write([2, 3], np.ones((2, 3), np.float32))
    other.close()
    assert resumed.finalize().complete
