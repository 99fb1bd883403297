"""kdcache pack: one zip that open_store, distill and verify read in place."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from narrowing import dense, stored

from kdcache import DistillConfig, create_store, open_store
from kdcache.errors import ConfigError, StoreExistsError, StoreIncompleteError
from kdcache.store.tools.pack import pack_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.loop import distill


def test_a_packed_store_trains_the_same_student(tmp_path, digits_store):
    packed = run_cli("pack", str(digits_store), str(tmp_path / "teacher.zip"))
    assert "packed" in packed.stdout
    assert (tmp_path / "teacher.zip").is_file()
    reader, original = open_store(tmp_path / "teacher.zip"), open_store(digits_store)
    assert reader.metadata == original.metadata
    np.testing.assert_array_equal(
        dense(reader.read(np.arange(1437))).numpy(), dense(original.read(np.arange(1437))).numpy()
    )
    assert verify_store(tmp_path / "teacher.zip").ok
    result = distill(
        DistillConfig(
            student="mlp:8",
            cache=str(tmp_path / "teacher.zip"),
            epochs=1,
            out=str(tmp_path / "run"),
            device="cpu",
        )
    )
    assert result.epochs == 1


def test_pack_refuses_unfinished_stores_and_never_clobbers(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2, chunk_rows=2)
    writer.write([0, 1], np.ones((2, 2)))
    writer.close()
    with pytest.raises(StoreIncompleteError, match="unfinished dump"):
        pack_store(tmp_path / "s.zarr", tmp_path / "s.zip")
    assert not list(tmp_path.glob("s.zip*"))
    with pytest.raises(ConfigError, match=r"must end in .zip"):
        pack_store(tmp_path / "s.zarr", tmp_path / "s.tar")
    (tmp_path / "taken.zip").write_text("keep me")
    with pytest.raises(StoreExistsError, match=r"already exists.*--overwrite"):
        pack_store(tmp_path / "s.zarr", tmp_path / "taken.zip")
    assert (tmp_path / "taken.zip").read_text() == "keep me"


def _without_permission_overrides() -> None:
    """In the child: drop root's right to write anywhere, so a read-only folder is read-only."""
    if os.geteuid() == 0:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
                raise OSError(ctypes.get_errno(), "cannot drop a capability")


def test_pack_into_a_read_only_folder_says_so_in_one_line_and_leaves_nothing(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2, chunk_rows=2)
    writer.write([0, 1, 2, 3], np.ones((4, 2)))
    writer.finalize()
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    result = run_cli(
        "pack",
        str(tmp_path / "s.zarr"),
        str(folder / "s.zip"),
        check=False,
        preexec_fn=_without_permission_overrides,
    )
    assert_one_line_error(result, f"cannot write {folder / 's.zip'}: Permission denied")
    assert not list(folder.iterdir())


def test_pack_keeps_every_array_the_store_pinned_even_one_it_does_not_know(tmp_path):
    ids = np.array([7, 3, 5], dtype=np.int64)
    writer = create_store(
        tmp_path / "s.zarr", num_samples=3, num_classes=2, chunk_rows=2, arrays={"ids": ids}
    )
    writer.write(np.arange(3), np.ones((3, 2)))
    writer.finalize()
    pack_store(tmp_path / "s.zarr", tmp_path / "s.zip")
    assert verify_store(tmp_path / "s.zip").ok
    packed = open_store(tmp_path / "s.zip")
    assert stored(packed.group, "ids").tolist() == ids.tolist()
