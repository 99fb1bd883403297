"""Files kdcache must never damage or leak: lock paths, pack inputs, a store being replaced."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from narrowing import dense

from kdcache import create_store, open_store
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    PathInTheWayError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreWriteError,
)
from kdcache.store.tools.pack import pack_store


def small_store(path, value: float = 1.0, **options):
    writer = create_store(
        path, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32", **options
    )
    writer.write(np.arange(6), np.full((6, 3), value))
    return writer.finalize()


def test_a_planted_link_fifo_or_foreign_file_at_the_lock_path_is_never_written(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("secret")
    (tmp_path / "a.zarr.lock").symlink_to(victim)
    with pytest.raises(StoreWriteError, match="symbolic link"):
        create_store(tmp_path / "a.zarr", num_samples=4, num_classes=2)
    os.link(victim, tmp_path / "b.zarr.lock")  # a hard link to the victim
    with pytest.raises(StoreWriteError, match="hard links"):
        create_store(tmp_path / "b.zarr", num_samples=4, num_classes=2)
    os.mkfifo(tmp_path / "c.zarr.lock")
    with pytest.raises(StoreWriteError, match="not a regular file"):
        create_store(tmp_path / "c.zarr", num_samples=4, num_classes=2)
    (tmp_path / "d.zarr.lock").write_text("my notes")
    with pytest.raises(StoreWriteError, match="other than a kdcache lock record"):
        create_store(tmp_path / "d.zarr", num_samples=4, num_classes=2)
    assert victim.read_text() == "secret"
    assert (tmp_path / "d.zarr.lock").read_text() == "my notes"
    assert not any((tmp_path / name).exists() for name in ("a.zarr", "b.zarr", "d.zarr"))


def test_aliases_of_a_store_share_its_one_lock(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2, chunk_rows=2)
    (tmp_path / "alias.zarr").symlink_to(tmp_path / "s.zarr")
    for alias in (tmp_path / "alias.zarr", f"{tmp_path}/s.zarr/.", f"{tmp_path}/x/../s.zarr"):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            create_store(alias, num_samples=4, num_classes=2, chunk_rows=2, resume=True)
    writer.close()


def test_pack_copies_only_the_stores_own_files_and_refuses_links(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store)
    (store / "runs").mkdir()
    (store / "runs" / "last.pt").write_bytes(b"checkpoint")
    (store / "notes.txt").write_text("private")
    pack_store(store, tmp_path / "s.zip")
    names = zipfile.ZipFile(tmp_path / "s.zip").namelist()
    assert not [name for name in names if "runs" in name or "notes" in name]
    assert dense(open_store(tmp_path / "s.zip").read([5])).tolist() == [[1.0, 1.0, 1.0]]

    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    chunk = store / "logits" / "c" / "1" / "0"
    chunk.unlink()
    chunk.symlink_to(secret)
    with pytest.raises(StoreFormatError, match="symbolic link"):
        pack_store(store, tmp_path / "leak.zip")
    assert not list(tmp_path.glob("leak.zip*"))
    with pytest.raises(ConfigError, match="inside the Zarr store"):
        pack_store(store, store / "logits" / "s.zip")


def test_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store, 1.0)
    reader = open_store(store)
    writer = create_store(
        store, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32", overwrite=True
    )
    writer.write(np.arange(2), np.full((2, 3), 2.0))
    with pytest.raises(InvalidLogitsError, match="NaN"):  # the new teacher fails midway
        writer.write(np.arange(2, 4), np.full((2, 3), np.nan))
    writer.close()
    assert dense(open_store(store).read([0])).tolist() == [
        [1.0, 1.0, 1.0]
    ]  # the old store is intact
    resumed = create_store(
        store, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32", resume=True
    )
    assert resumed.pending_indices().tolist() == [2, 3, 4, 5]  # the replacement resumes
    resumed.write(np.arange(2, 6), np.full((4, 3), 2.0))
    resumed.finalize()
    assert dense(open_store(store).read([0, 5])).tolist() == [[2.0] * 3, [2.0] * 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]
    with pytest.raises(Exception, match="changed while it was being read"):
        reader.load()  # a reader of the old store stops instead of mixing two teachers


def test_overwrite_refuses_to_delete_what_is_not_part_of_the_store(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store)
    (store / "run").mkdir()
    (store / "run" / "best.pt").write_bytes(b"weights")
    with pytest.raises(StoreExistsError, match=r"run/best.pt"):
        small_store(store, overwrite=True)
    assert (store / "run" / "best.pt").read_bytes() == b"weights"


def test_a_link_planted_at_the_pack_temporary_never_redirects_the_zip(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store)
    victim = tmp_path / "victim.txt"
    victim.write_text("secret")
    (tmp_path / "s.zip.partial").symlink_to(victim)
    with pytest.raises(PathInTheWayError, match=r"s.zip.partial, .* is a symbolic link"):
        pack_store(store, tmp_path / "s.zip")
    assert victim.read_text() == "secret"
    assert not (tmp_path / "s.zip").exists()
    (tmp_path / "s.zip.partial").unlink()
    (tmp_path / "s.zip.partial").write_bytes(b"left by a killed pack")
    pack_store(store, tmp_path / "s.zip")  # our own leftover is recognised and replaced
    assert not (tmp_path / "s.zip.partial").exists()
    assert dense(open_store(tmp_path / "s.zip").read([5])).tolist() == [[1.0, 1.0, 1.0]]


def test_a_link_at_the_staging_folder_never_makes_resume_write_into_another_store(tmp_path):
    store, other = tmp_path / "s.zarr", tmp_path / "other.zarr"
    small_store(store, 1.0)
    unfinished = create_store(other, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32")
    unfinished.write(np.arange(2), np.full((2, 3), 5.0))
    unfinished.close()
    (tmp_path / "s.zarr.incoming").symlink_to(other)
    for options in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(PathInTheWayError, match=r"s.zarr.incoming, .* is a symbolic link"):
            small_store(store, 2.0, **options)
    assert (tmp_path / "s.zarr.incoming").is_symlink()
    assert store.is_dir()
    assert not store.is_symlink()
    assert dense(open_store(store).read([0])).tolist() == [[1.0, 1.0, 1.0]]
    reopened = create_store(
        other, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32", resume=True
    )
    assert reopened.pending_indices().tolist() == [2, 3, 4, 5]  # the other store is untouched
    reopened.close()


def test_what_is_in_the_way_of_a_replacement_is_refused_in_one_line_and_kept(tmp_path):
    store, staging = tmp_path / "s.zarr", tmp_path / "s.zarr.incoming"
    small_store(store, 1.0)
    staging.write_text("a file")
    with pytest.raises(PathInTheWayError, match="is a file"):
        small_store(store, 2.0, overwrite=True)
    staging.unlink()
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="is not a kdcache store") as error:
        small_store(store, 2.0, overwrite=True)
    assert "\n" not in str(error.value)
    assert (staging / "notes.txt").read_text() == "mine"
    (staging / "notes.txt").unlink()
    staging.rmdir()
    small_store(staging, 3.0)  # a complete store of its own at that name
    with pytest.raises(StoreExistsError, match="holds a complete kdcache store"):
        small_store(store, 2.0, overwrite=True)
    assert dense(open_store(staging).read([0])).tolist() == [[3.0, 3.0, 3.0]]
    assert dense(open_store(store).read([0])).tolist() == [[1.0, 1.0, 1.0]]


def test_an_interrupted_replacement_is_cleared_by_the_next_overwrite(tmp_path):
    store = tmp_path / "s.zarr"
    small_store(store, 1.0)
    writer = create_store(
        store, num_samples=6, num_classes=3, chunk_rows=2, encoding="float32", overwrite=True
    )
    writer.write(np.arange(2), np.full((2, 3), 2.0))
    writer.close()
    small_store(store, 3.0, overwrite=True)
    assert dense(open_store(store).read([0, 5])).tolist() == [[3.0] * 3, [3.0] * 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]
