"""Nothing silently wrong: chunks bound to their index, pinned array metadata, finite rows."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import zarr
from narrowing import dense, kdcache_record, zarr_array

from kdcache import create_store, open_store
from kdcache.errors import StoreCorruptError, StoreFormatError
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
