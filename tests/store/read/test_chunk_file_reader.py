"""Chunks decoded from a local store's files straight into the feed's table: the same rows as
zarr's path, and every chunk that is wrong still refused (digest, finiteness, damaged files)."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest
import zarr
from narrowing import kdcache_record, present, zarr_array
from numcodecs import zstd

from kdcache import create_store, open_store
from kdcache.errors import StoreCorruptError
from kdcache.store.format.digests import DIGESTS_ARRAY, chunk_digest
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.format.packed_ints import pack_rows
from kdcache.store.read.chunk_files import ChunkFileReader
from kdcache.store.tools.pack import pack_store

NUM_SAMPLES, NUM_CLASSES, CHUNK_ROWS = 47, 5, 10
#: Four chunks of float16 rows: the chunked feed's budget.
BUDGET = 4 * CHUNK_ROWS * NUM_CLASSES * 2


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    writer = create_store(
        path,
        num_samples=NUM_SAMPLES,
        num_classes=NUM_CLASSES,
        chunk_rows=CHUNK_ROWS,
        encoding="float16",
    )
    values = np.arange(NUM_SAMPLES * NUM_CLASSES, dtype=np.float32).reshape(NUM_SAMPLES, -1)
    writer.write(np.arange(NUM_SAMPLES), values / 8)
    writer.finalize()
    return path


def chunk_reader(path) -> tuple[ChunkFileReader, zarr.Array]:
    array = open_store(path).guard.array("logits")
    files = ChunkFileReader.for_array(array)
    assert files is not None
    return files, array


def test_chunk_files_decode_what_zarr_decodes_the_last_partial_chunk_too(store):
    files, array = chunk_reader(store)
    for chunk in range(5):
        low, high = chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, NUM_SAMPLES)
        out = np.full((high - low, NUM_CLASSES), np.nan, dtype=np.float16)
        assert files.decode_into(chunk, out)
        np.testing.assert_array_equal(out, array[low:high])


def test_a_chunk_moved_to_another_index_decodes_and_is_refused_by_its_digest(store):
    chunks = store / "logits" / "c"
    (chunks / "0" / "0").write_bytes((chunks / "2" / "0").read_bytes())  # crc32c still holds
    files, _ = chunk_reader(store)
    assert files.decode_into(0, np.empty((CHUNK_ROWS, NUM_CLASSES), dtype=np.float16))
    with pytest.raises(StoreCorruptError, match="does not match the digest recorded for chunk 0"):
        open_store(store, memory_budget=BUDGET).read([3])
    with pytest.raises(StoreCorruptError, match="does not match the digest recorded for chunk 0"):
        open_store(store).load()


def refuses_on_zarrs_path(store, forged: bytes) -> None:
    """The chunk file of chunk 1 replaced by ``forged``: the file path declines it, and the
    feed refuses it (zarr's path names the samples)."""
    (store / "logits" / "c" / "1" / "0").write_bytes(forged)
    files, _ = chunk_reader(store)
    assert not files.decode_into(1, np.empty((CHUNK_ROWS, NUM_CLASSES), dtype=np.float16))
    with pytest.raises(StoreCorruptError, match="samples 10-19"):
        open_store(store, memory_budget=BUDGET).read([12])


def test_a_damaged_chunk_file_is_left_to_zarr_and_refused(store):
    original = (store / "logits" / "c" / "1" / "0").read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    refuses_on_zarrs_path(store, bytes(damaged))


@pytest.mark.parametrize("length", [0, 1, 3])
def test_a_chunk_file_shorter_than_its_checksum_is_left_to_zarr_and_refused(store, length):
    original = (store / "logits" / "c" / "1" / "0").read_bytes()
    refuses_on_zarrs_path(store, original[:length])


def test_a_frame_of_fewer_rows_than_a_chunk_is_left_to_zarr_and_refused(store):
    """numcodecs would decompress a short frame into the slot and leave the rest as it was."""
    short = bytes(zstd.compress(np.zeros((3, NUM_CLASSES), dtype=np.float16).tobytes(), 1))
    refuses_on_zarrs_path(store, short + google_crc32c.value(short).to_bytes(4, "little"))


def test_nan_written_with_its_digest_recorded_is_refused_on_the_file_path(store):
    group = zarr.open_group(str(store), mode="r+")
    meta = StoreMetadata.from_dict(kdcache_record(group), where=str(store))
    logits = zarr_array(group, "logits")
    values = np.asarray(logits[10:20])
    values[3] = np.nan
    logits[10:20] = values
    digests = zarr_array(group, DIGESTS_ARRAY)
    table = np.asarray(digests[1])
    table[present(meta.digests)["arrays"].index("logits")] = chunk_digest(
        meta.chunk_binding, "logits", 1, values
    )
    digests[1] = table
    files, _ = chunk_reader(store)
    assert files.decode_into(1, np.empty((CHUNK_ROWS, NUM_CLASSES), dtype=np.float16))
    with pytest.raises(StoreCorruptError, match="NaN or Inf for samples 13"):
        open_store(store, memory_budget=BUDGET).read([13])


def test_a_zip_store_keeps_zarrs_path(store, tmp_path):
    pack_store(store, tmp_path / "s.zip")
    reader = open_store(tmp_path / "s.zip", memory_budget=BUDGET)
    assert ChunkFileReader.for_array(reader.guard.array("logits")) is None
    np.testing.assert_array_equal(
        reader.feed.gather([46, 0])["logits"], open_store(store).feed.gather([46, 0])["logits"]
    )


@pytest.fixture(params=["topk:2", "sampled:3"])
def sparse_store(tmp_path, request):
    path = tmp_path / "sparse.zarr"
    writer = create_store(
        path,
        num_samples=NUM_SAMPLES,
        num_classes=NUM_CLASSES,
        chunk_rows=CHUNK_ROWS,
        encoding=request.param,
    )
    rng = np.random.default_rng(0)
    writer.write(np.arange(NUM_SAMPLES), rng.normal(size=(NUM_SAMPLES, NUM_CLASSES)) * 3)
    writer.finalize()
    return path


def packed_arrays(path) -> list[zarr.Array]:
    reader = open_store(path)
    return [reader.guard.array(name) for name in reader.encoding.packed_arrays]


def test_packed_chunks_decode_what_zarr_decodes_the_last_partial_chunk_too(sparse_store):
    for array in packed_arrays(sparse_store):
        files = ChunkFileReader.for_array(array)
        assert files is not None, array.name
        for chunk in range(5):
            low, high = chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, NUM_SAMPLES)
            out = np.zeros((high - low, *array.shape[1:]), dtype=array.dtype)
            assert files.decode_into(chunk, out)
            np.testing.assert_array_equal(out, array[low:high])


@pytest.mark.parametrize("forgery", ["three rows", "another dtype", "not packed", "huge frame"])
def test_a_packed_chunk_not_of_one_chunk_is_left_to_zarr_and_refused(sparse_store, forgery):
    array = packed_arrays(sparse_store)[0]
    shape = (CHUNK_ROWS, *array.shape[1:])
    if forgery == "three rows":
        frame = bytes(zstd.compress(pack_rows(np.zeros((3, *array.shape[1:]), array.dtype)), 1))
    elif forgery == "another dtype":  # as many values, twice as wide
        wider = np.dtype(f"u{2 * array.dtype.itemsize}")
        frame = bytes(zstd.compress(pack_rows(np.zeros(shape, wider)), 1))
    elif forgery == "not packed":
        frame = bytes(zstd.compress(b"KDPI" + bytes(40), 1))
    else:  # a frame declaring 1 TiB of content (then one empty last block): never allocated
        frame = b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    path = sparse_store / array.name.strip("/") / "c" / "1" / "0"
    path.write_bytes(frame + google_crc32c.value(frame).to_bytes(4, "little"))
    files = ChunkFileReader.for_array(array)
    assert files is not None
    assert not files.decode_into(1, np.zeros(shape, array.dtype))
    if forgery == "huge frame":
        return  # zarr's own path would try to allocate it: the frame stops at this path
    with pytest.raises(StoreCorruptError, match="samples 10-19"):
        open_store(sparse_store).load()
