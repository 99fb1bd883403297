"""Every array and the record under digests: view_params, labels, offsets, first_token and the
metadata record are refused once edited, swapped or taken from another store, and a store of
the newer format cannot be downgraded by deleting its digests. Stores as the previous release
wrote them still load and verify."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from narrowing import dense, kdcache_record, stored, zarr_array
from older_stores import as_previous_release

from kdcache import create_store, open_store
from kdcache.errors import StoreCorruptError, StoreFormatError, StoreMismatchError
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.verify import verify_store

AUGMENT = {
    "recipe": "flip",
    "seed": 3,
    "sampler": "counter-v1",
    "fields": ["flip"],
    "input_size": [8, 8],
}
N, V, C = 6, 2, 3
LOGITS = np.arange(N * V * C, dtype=np.float32).reshape(N * V, C) / 5
SEQUENCES = [np.array([1, 4, 2]), np.array([3, 3, 0, 5, 6]), np.array([6, 1])]
VOCAB = 7


def flips(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(N, V, 1)).astype(np.float32)


def write_views_store(path: Path, params: np.ndarray, *, resume: bool = False, rows=None):
    writer = create_store(
        path,
        num_samples=N,
        num_classes=C,
        encoding="float32",
        views=V,
        augment=AUGMENT,
        view_params=params,
        labels=np.arange(N) % C,
        chunk_rows=4,
        resume=resume,
    )
    rows = np.arange(N * V) if rows is None else rows
    writer.write(rows, LOGITS[rows])
    if rows.size == N * V:
        writer.finalize()
    writer.close()


@pytest.fixture
def views_store(tmp_path) -> Path:
    path = tmp_path / "v.zarr"
    write_views_store(path, flips(0))
    return path


@pytest.fixture
def sequence_store(tmp_path) -> Path:
    path = tmp_path / "lm.zarr"
    writer = create_sequence_store(
        path, sequences=SEQUENCES, vocab_size=VOCAB, encoding="float32", chunk_rows=3
    )
    rows = sum(len(s) - 1 for s in SEQUENCES)
    writer.write(range(len(SEQUENCES)), np.arange(rows * VOCAB, dtype=np.float32).reshape(rows, -1))
    writer.finalize()
    return path


def problems_of(path: Path) -> str:
    return "\n".join(verify_store(path).problems)


def edit_record(path: Path, edit) -> None:
    group = zarr.open_group(str(path), mode="r+")
    record = kdcache_record(group)
    edit(record)
    group.attrs["kdcache"] = record


def test_a_new_store_records_a_digest_for_every_array_and_its_record(views_store, sequence_store):
    digests = kdcache_record(zarr.open_group(str(views_store), mode="r"))["digests"]
    assert sorted(digests["whole"]) == ["labels", "view_params"]
    assert len(digests["record"]) == 32
    digests = kdcache_record(zarr.open_group(str(sequence_store), mode="r"))["digests"]
    assert sorted(digests["whole"]) == ["first_token", "labels", "offsets"]
    assert verify_store(views_store).ok
    assert verify_store(sequence_store).ok
    assert open_sequence_store(sequence_store).tokens(1).tolist() == SEQUENCES[1].tolist()


def _edited(group, params):
    params[2, 1, 0] = 1 - params[2, 1, 0]


def _swapped(group, params):
    params[[0, 1]] = params[[1, 0]]


def _out_of_range(group, params):
    params[4, 0, 0] = 7


@pytest.mark.parametrize("attack", [_edited, _swapped, _out_of_range], ids=lambda a: a.__name__)
def test_view_params_edited_swapped_or_out_of_range_behind_the_writer_are_refused(
    views_store, attack
):
    group = zarr.open_group(str(views_store), mode="r+")
    params = stored(group, "view_params")
    params[0, :, 0], params[1, :, 0] = 0, 1  # samples 0 and 1 differ
    attack(group, params)
    zarr_array(group, "view_params")[:] = params
    with pytest.raises(StoreCorruptError, match="'view_params' does not match the digest"):
        open_store(views_store).read_views([0])
    assert "'view_params' does not match the digest" in problems_of(views_store)


def test_view_params_of_another_seed_are_refused(views_store, tmp_path):
    other = tmp_path / "other.zarr"
    write_views_store(other, flips(1))
    shutil.rmtree(views_store / "view_params")
    shutil.copytree(other / "view_params", views_store / "view_params")
    with pytest.raises(StoreCorruptError, match="'view_params' does not match the digest"):
        _ = open_store(views_store).view_params
    assert not verify_store(views_store).ok


def test_a_flipped_byte_in_view_params_is_one_line(views_store):
    chunk = next(p for p in (views_store / "view_params" / "c").rglob("*") if p.is_file())
    content = bytearray(chunk.read_bytes())
    content[len(content) // 2] ^= 0x01
    chunk.write_bytes(bytes(content))
    with pytest.raises(StoreCorruptError, match="array 'view_params' does not decode") as error:
        _ = open_store(views_store).view_params
    assert "\n" not in str(error.value)
    assert "'view_params' does not decode" in problems_of(views_store)


def test_edited_labels_are_refused(views_store):
    group = zarr.open_group(str(views_store), mode="r+")
    zarr_array(group, "labels")[4] = 0  # was 1
    with pytest.raises(StoreCorruptError, match="'labels' does not match the digest"):
        _ = open_store(views_store).labels
    assert "'labels' does not match the digest" in problems_of(views_store)


@pytest.mark.parametrize(("name", "index"), [("offsets", 1), ("first_token", 2)])
def test_edited_offsets_or_first_token_are_refused(sequence_store, name, index):
    group = zarr.open_group(str(sequence_store), mode="r+")
    values = stored(group, name)
    values[index] += 1
    zarr_array(group, name)[:] = values
    with pytest.raises(StoreCorruptError, match=f"'{name}' does not match the digest"):
        open_sequence_store(sequence_store)
    assert f"'{name}' does not match the digest" in problems_of(sequence_store)


def test_an_older_sequence_store_is_checked_against_its_record(sequence_store):
    as_previous_release(sequence_store)
    assert verify_store(sequence_store).ok
    group = zarr.open_group(str(sequence_store), mode="r+")
    zarr_array(group, "offsets")[1] = 7  # offsets 0, 7, 6, 7: backwards at sample 1
    zarr_array(group, "first_token")[0] = VOCAB
    with pytest.raises(StoreCorruptError, match="offsets decrease at samples 1"):
        open_sequence_store(sequence_store)
    problems = problems_of(sequence_store)
    assert "offsets decrease at samples 1" in problems
    assert "first_token lies outside the vocabulary [0, 7) for samples 0" in problems


@pytest.mark.parametrize(
    ("store", "edit"),
    [
        ("views_store", lambda record: record["augment"].update(seed=4)),
        ("views_store", lambda record: record["augment"].update(input_size=[9, 8])),
        ("views_store", lambda record: record.update(chunk_rows=6)),
        ("sequence_store", lambda record: record["extra"]["sequence"].update(max_length=99)),
    ],
    ids=["augment.seed", "augment.input_size", "chunk_rows", "extra.sequence"],
)
def test_a_record_edited_after_writing_is_refused(request, store, edit):
    path = request.getfixturevalue(store)
    edit_record(path, edit)
    with pytest.raises(StoreFormatError, match="metadata edited since it was written"):
        open_store(path)
    with pytest.raises(StoreFormatError, match="metadata edited since it was written"):
        verify_store(path)


def test_a_seed_edited_before_resume_is_refused(tmp_path):
    path = tmp_path / "v.zarr"
    write_views_store(path, flips(0), rows=np.arange(4))  # one of three chunks
    edit_record(path, lambda record: record["augment"].update(seed=4))
    with pytest.raises(StoreFormatError, match="metadata edited since it was written"):
        write_views_store(path, flips(0), resume=True)
    # Another table of views under an unchanged record is refused as well.
    edit_record(path, lambda record: record["augment"].update(seed=3))
    with pytest.raises(StoreMismatchError, match=r"cannot resume .* its view_params differ"):
        write_views_store(path, flips(1), resume=True)
    write_views_store(path, flips(0), resume=True)
    assert verify_store(path).ok


def test_an_older_store_resumed_with_other_view_params_is_refused(tmp_path):
    path = tmp_path / "v.zarr"
    write_views_store(path, flips(0), rows=np.arange(4))
    as_previous_release(path)
    with pytest.raises(StoreMismatchError, match="its view_params differ"):
        write_views_store(path, flips(1), resume=True)
    write_views_store(path, flips(0), resume=True)
    report = verify_store(path)
    assert report.ok


def _no_digests(record):
    record["digests"] = None


def _no_whole_digests(record):
    del record["digests"]["whole"]


def _stripped_to_the_older_fields(record):
    del record["digests"]["whole"], record["digests"]["record"]


@pytest.mark.parametrize(
    ("strip", "message"),
    [
        (_no_digests, "lacks integrity data its format records \\(it carries generation"),
        (_no_whole_digests, "it records digests.record but not digests.whole"),
    ],
    ids=["digests", "digests.whole"],
)
def test_digests_deleted_from_a_new_store_are_corruption(views_store, strip, message):
    edit_record(views_store, strip)
    with pytest.raises(StoreFormatError, match=message) as error:
        open_store(views_store)
    assert "\n" not in str(error.value)
    with pytest.raises(StoreFormatError, match=message):
        verify_store(views_store)


def test_a_store_stripped_to_the_older_fields_fails_every_chunk(views_store):
    # Its chunk digests are bound to the record digest: without it none of them matches.
    edit_record(views_store, _stripped_to_the_older_fields)
    with pytest.raises(StoreCorruptError, match="does not match the digest recorded for chunk 0"):
        open_store(views_store).load()
    assert "chunks do not match the digest recorded" in problems_of(views_store)


def test_a_deleted_digest_table_is_refused(views_store):
    shutil.rmtree(views_store / "chunk_digests")
    with pytest.raises(StoreFormatError, match="lacks its array 'chunk_digests'"):
        open_store(views_store)
    assert "chunk_digests" in problems_of(views_store)


def test_an_array_added_behind_the_writer_is_not_trusted(views_store):
    group = zarr.open_group(str(views_store), mode="r+")
    group.create_array("offsets", shape=(3,), dtype="int64", fill_value=0)[:] = [0, 1, 2]
    assert "'offsets' is not covered by the store's digests" in problems_of(views_store)


def test_a_store_of_the_previous_release_loads_and_verifies(views_store):
    as_previous_release(views_store)
    record = kdcache_record(zarr.open_group(str(views_store), mode="r"))
    assert "whole" not in record["digests"]
    reader = open_store(views_store)
    np.testing.assert_array_equal(reader.view_params, flips(0))
    np.testing.assert_array_equal(dense(reader.read(np.arange(N * V))).numpy(), LOGITS)
    report = verify_store(views_store)
    assert report.ok
    assert "digested its record and labels, view_params" in report.notes[0]


def test_a_deleted_offsets_array_is_named(sequence_store):
    shutil.rmtree(sequence_store / "offsets")
    with pytest.raises(StoreFormatError, match="lacks its array 'offsets'"):
        open_sequence_store(sequence_store)
    assert "'offsets' is missing" in problems_of(sequence_store)


def test_a_lost_chunk_of_an_older_stores_view_params_is_refused(views_store):
    # Without a digest, zarr would read the lost chunk as zeros: valid flips, wrong views.
    as_previous_release(views_store)
    next(p for p in (views_store / "view_params" / "c").rglob("*") if p.is_file()).unlink()
    with pytest.raises(StoreCorruptError, match="'view_params' lacks some of its chunks"):
        _ = open_store(views_store).view_params
    assert "'view_params' lacks some of its chunks" in problems_of(views_store)
