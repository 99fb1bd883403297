"""Nothing silently wrong: chunks bound to their index, pinned array metadata, finite rows."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import zarr
from narrowing import dense, kdcache_record, present, zarr_array

from kdcache import create_store, open_store
from kdcache.errors import InvalidLogitsError, StoreCorruptError, StoreFormatError
from kdcache.logits.encodings import parse_encoding
from kdcache.store.tools.verify import verify_store


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    writer = create_store(
        path, num_samples=40, num_classes=4, chunk_rows=10, encoding="float32", labels=[0] * 40
    )
    writer.write(np.arange(40), np.arange(160, dtype=np.float32).reshape(40, 4))
    writer.finalize()
    return path


def test_a_chunk_copied_swapped_or_linked_to_another_index_is_refused(store):
    chunks = store / "logits" / "c"
    first, second = chunks / "0" / "0", chunks / "2" / "0"
    saved = first.read_bytes()
    first.write_bytes(second.read_bytes())  # the crc32c still holds: only the place is wrong
    assert "samples 0-9" in "\n".join(verify_store(store).problems)
    with pytest.raises(StoreCorruptError, match="does not match the digest recorded for chunk 0"):
        open_store(store).load()
    first.unlink()
    first.symlink_to(second)
    with pytest.raises(StoreCorruptError, match="samples 0-9"):
        open_store(store, memory_budget="1KiB").read([3])  # the chunked feed checks too
    first.unlink()
    first.write_bytes(saved)
    assert verify_store(store).ok


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta.update(data_type="int32"),
        lambda meta: meta["codecs"].insert(
            0, {"name": "transpose", "configuration": {"order": [1, 0]}}
        ),
    ],
)
def test_an_edited_array_zarr_json_is_refused_by_open_and_verify(store, edit):
    path = store / "logits" / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="array 'logits' has"):
        open_store(store)
    assert not verify_store(store).ok


def test_nan_rows_written_behind_the_writers_back_stop_the_feed(store):
    group = zarr.open_group(str(store), mode="r+")
    zarr_array(group, "logits")[13] = np.nan
    with pytest.raises(StoreCorruptError, match=r"samples 10-19|NaN or Inf for samples 13"):
        open_store(store).load()


def test_stores_without_digests_still_load_and_verify_notes_it(store, tmp_path):
    group = zarr.open_group(str(store), mode="r+")
    record = dict(kdcache_record(group))
    record.update(digests=None, arrays=None, generation="")
    group.attrs["kdcache"] = record
    shutil.rmtree(store / "chunk_digests")
    np.testing.assert_array_equal(
        dense(open_store(store).read([39])).numpy()[0], [156, 157, 158, 159]
    )
    report = verify_store(store)
    assert report.ok
    assert "not bound to their index" in report.notes[0]


def test_two_chunks_swapped_inside_a_packed_zip_are_refused(store, tmp_path):
    from kdcache.store.tools.pack import pack_store

    pack_store(store, tmp_path / "s.zip")
    with zipfile.ZipFile(tmp_path / "s.zip") as packed:
        entries = {name: packed.read(name) for name in packed.namelist()}
    first, second = "logits/c/1/0", "logits/c/3/0"
    entries[first], entries[second] = entries[second], entries[first]
    with zipfile.ZipFile(tmp_path / "swapped.zip", "w", zipfile.ZIP_STORED) as swapped:
        for name, data in entries.items():
            swapped.writestr(name, data)
    assert "samples 10-19, 30-39" in "\n".join(verify_store(tmp_path / "swapped.zip").problems)
    with pytest.raises(StoreCorruptError, match="chunk 1"):
        open_store(tmp_path / "swapped.zip").load()


def _forge(path, name, row, value):
    """Write ``value`` into row ``row`` of the array ``name`` and record the chunk's digest
    again, so that only a range check can tell."""
    from kdcache.store.format.digests import DIGESTS_ARRAY, chunk_digest
    from kdcache.store.format.metadata import StoreMetadata

    group = zarr.open_group(str(path), mode="r+")
    meta = StoreMetadata.from_dict(kdcache_record(group), where=str(path))
    array = zarr_array(group, name)
    chunk = row // meta.chunk_rows
    low, high = meta.chunk_bounds(chunk)
    values = np.asarray(array[low:high])
    values[row - low] = value
    array[low:high] = values
    digests = zarr_array(group, DIGESTS_ARRAY)
    table = np.asarray(digests[chunk])
    table[present(meta.digests)["arrays"].index(name)] = chunk_digest(
        meta.chunk_binding, name, chunk, values
    )
    digests[chunk] = table


@pytest.mark.parametrize(
    ("encoding", "name", "value", "message"),
    [
        ("int8", "scale", 0.0, "array 'scale' holds 0.0, outside its valid range (0, 3.40282e+38]"),
        (
            "int8",
            "scale",
            -2.0,
            "array 'scale' holds -2.0, outside its valid range (0, 3.40282e+38]",
        ),
        (
            "topk:2",
            "topk_indices",
            7,
            "array 'topk_indices' holds 7, outside its valid range [0, 5]",
        ),
        (
            "topk:2:4",
            "topk_codes",
            16,
            "array 'topk_codes' holds 16, outside its valid range [0, 15]",
        ),
        (
            "topk:2:4",
            "topk_depth",
            -1.0,
            "array 'topk_depth' holds -1.0, outside its valid range (0, 65504]",
        ),
        (
            "topk:2:4",
            "topk_depth",
            0.0,
            "array 'topk_depth' holds 0.0, outside its valid range (0, 65504]",
        ),
        (
            "sampled:3",
            "sample_indices",
            6,
            "array 'sample_indices' holds 6, outside its valid range [0, 5]",
        ),
        (
            "sampled:3",
            "sample_counts",
            4,
            "array 'sample_counts' holds 4, outside its valid range [0, 3]",
        ),
        (
            "viewset:2:4",
            "set_indices",
            200,
            "array 'set_indices' holds 200, outside its valid range [0, 5]",
        ),
        (
            "viewset:2:4",
            "set_codes",
            99,
            "array 'set_codes' holds 99, outside its valid range [0, 15]",
        ),
    ],
)
def test_values_outside_an_arrays_range_are_refused_in_one_line(
    tmp_path, encoding, name, value, message
):
    path = tmp_path / "s.zarr"
    writer = create_store(
        path, num_samples=20, num_classes=6, chunk_rows=10, encoding=encoding, labels=[0] * 20
    )
    rng = np.random.default_rng(0)
    writer.write(np.arange(20), rng.normal(size=(20, 6)).astype(np.float32))
    writer.finalize()
    _forge(path, name, 13, value)
    with pytest.raises(StoreCorruptError) as refused:
        open_store(path).load()
    assert message in str(refused.value)
    assert "samples 13" in str(refused.value)
    assert "\n" not in str(refused.value)
    problems = verify_store(path).problems
    assert any(message in line and "samples 13" in line for line in problems), problems
    copy = create_store(
        tmp_path / "copy.zarr", num_samples=20, num_classes=6, chunk_rows=10, encoding=encoding
    )
    encoded = parse_encoding(encoding).encode(rng.normal(size=(10, 6)).astype(np.float32))
    encoded[name][3] = value
    with pytest.raises(InvalidLogitsError) as refused_write:
        copy.write_encoded(np.arange(10, 20), encoded)
    assert message in str(refused_write.value)
    assert "samples 13" in str(refused_write.value)
