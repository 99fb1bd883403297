"""kdcache pack: one zip that open_store, distill and verify read in place."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from narrowing import dense

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
