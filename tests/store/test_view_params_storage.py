"""How ``view_params`` is stored: exact round trip, its codecs, and stores made with the old ones.

``data/views-zstd-view-params.zip`` was made (and packed) by kdcache at commit 2c877c9, whose
``view_params`` used the plain ``bytes -> zstd -> crc32c`` codecs: N = 6, V = 2, C = 5, float32
logits ``arange(60)``, recipe ``rrc:scale=0.25-1+flip`` (seed 0, 8 x 8 inputs), chunk_rows 4.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from narrowing import kdcache_record, stored, zarr_array
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache import create_store, open_store, pack_store, parse_recipe, verify_store
from kdcache.errors import StoreFormatError

OLD_STORE = Path(__file__).parent / "data" / "views-zstd-view-params.zip"
#: Its view_params: what 2c877c9's generator (numpy default_rng per view, before counter-v1) drew
#: for "rrc:scale=0.25-1+flip", seed 0, 6 samples, 2 views, 8x8 inputs.
OLD_PARAMS = np.array(
    [
        [[0, 0, 7, 6, 1], [2, 1, 6, 6, 1]],
        [[0, 0, 8, 8, 0], [0, 1, 8, 7, 0]],
        [[0, 3, 5, 4, 1], [1, 1, 6, 7, 1]],
        [[2, 1, 6, 5, 0], [2, 0, 4, 5, 0]],
        [[0, 1, 8, 7, 1], [0, 0, 8, 8, 0]],
        [[1, 1, 6, 6, 1], [3, 0, 5, 7, 0]],
    ],
    dtype=np.float32,
)


def codec_names(store: Path) -> list[str]:
    return [
        c["name"] for c in json.loads((store / "view_params" / "zarr.json").read_text())["codecs"]
    ]


def stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in (folder / "c").rglob("*") if f.is_file())


def write_store(path: Path, table: np.ndarray, recipe_spec: str) -> None:
    n, views, width = table.shape
    writer = create_store(
        path,
        num_samples=n,
        num_classes=5,
        encoding="topk:2",
        views=views,
        augment={"recipe": recipe_spec, "seed": 0, "fields": [f"f{i}" for i in range(width)]},
        view_params=table,
        fsync=False,
    )
    writer.write(np.arange(n * views), np.ones((n * views, 5), dtype=np.float32))
    writer.finalize()


def test_view_params_round_trip_exactly_and_compress_better_than_plain_zstd(tmp_path):
    recipe = parse_recipe("rrc+flip+mixup:0.2")
    table = recipe.sample_table(seed=1, num_samples=300, views=4, size=(224, 224))
    write_store(tmp_path / "s.zarr", table, recipe.spec)
    assert codec_names(tmp_path / "s.zarr") == ["transpose", "bytes", "blosc", "crc32c"]
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").view_params, table)
    plain = stored(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"), "view_params")
    np.testing.assert_array_equal(plain, table)  # plain zarr reads it too
    assert verify_store(tmp_path / "s.zarr").ok
    pack_store(tmp_path / "s.zarr", tmp_path / "s.zip")
    np.testing.assert_array_equal(open_store(tmp_path / "s.zip").view_params, table)
    # The same table with the codecs kdcache used before.
    old = zarr.create_array(
        str(tmp_path / "old"),
        shape=table.shape,
        chunks=table.shape,
        dtype="float32",
        fill_value=0,
        compressors=[ZstdCodec(level=1), Crc32cCodec()],
    )
    old[:] = table
    assert stored_bytes(tmp_path / "s.zarr" / "view_params") < 0.8 * stored_bytes(tmp_path / "old")
    # Lossless for any float32, not only small integers: signs, subnormals, huge values.
    rng = np.random.default_rng(0)
    floats = (rng.normal(size=(50, 3, 7)) * 10.0 ** rng.integers(-40, 38, (50, 3, 7))).astype(
        np.float32
    )
    write_store(tmp_path / "f.zarr", floats, "any")
    np.testing.assert_array_equal(open_store(tmp_path / "f.zarr").view_params, floats)


def test_a_store_with_the_old_view_params_codecs_loads_verifies_and_resumes(tmp_path):
    expected = OLD_PARAMS
    logits = np.arange(60, dtype=np.float32).reshape(12, 5)
    reader = open_store(OLD_STORE)  # the packed zip as the old kdcache made it
    np.testing.assert_array_equal(reader.view_params, expected)
    np.testing.assert_array_equal(reader.read_views([5])[0].numpy(), logits[None, 10:12])
    assert verify_store(OLD_STORE).ok
    folder = tmp_path / "old.zarr"
    with zipfile.ZipFile(OLD_STORE) as packed:
        packed.extractall(folder)
    assert codec_names(folder) == ["bytes", "zstd", "crc32c"]
    assert verify_store(folder).ok
    # Interrupt it (record incomplete, last chunk unwritten) and resume with today's writer.
    group = zarr.open_group(str(folder), mode="r+")
    group.attrs["kdcache"] = {**kdcache_record(group), "complete": False}
    zarr_array(group, "chunk_written")[2] = 0
    writer = create_store(
        folder,
        num_samples=6,
        num_classes=5,
        encoding="float32",
        views=2,
        augment=reader.metadata.augment,
        view_params=expected,
        labels=np.arange(6) % 5,
        chunk_rows=4,
        resume=True,
    )
    np.testing.assert_array_equal(writer.pending_indices(), np.arange(8, 12))
    writer.write(np.arange(8, 12), logits[8:])
    writer.finalize()
    assert codec_names(folder) == ["bytes", "zstd", "crc32c"]  # kept, not rewritten
    np.testing.assert_array_equal(open_store(folder).view_params, expected)
    assert verify_store(folder).ok


def test_an_edited_view_params_zarr_json_is_refused(tmp_path):
    table = parse_recipe("rrc+flip").sample_table(seed=0, num_samples=20, views=2, size=(32, 32))
    write_store(tmp_path / "s.zarr", table, "rrc+flip")
    path = tmp_path / "s.zarr" / "view_params" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["codecs"] = meta["codecs"][1:]  # drop the transpose: the same bytes, other numbers
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="array 'view_params' has edited codecs"):
        open_store(tmp_path / "s.zarr").read_views([0], temperature=1.0)
    problems = verify_store(tmp_path / "s.zarr").problems
    assert any("'view_params' has edited codecs" in p for p in problems), problems
