"""write_verified_store: the one create-fill-verify-publish sequence behind convert, merge, concat
and the bridges' imports. A failed fill or a failed verification never touches an existing
output, and every command's new store is verified before it is published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdcache import create_store, open_store
from kdcache.errors import StoreCorruptError
from kdcache.store.bridges.topk import write_new_store
from kdcache.store.tools import verified_write
from kdcache.store.tools.concat import concat_stores
from kdcache.store.tools.convert import convert_store
from kdcache.store.tools.merge import merge_stores
from kdcache.store.tools.verified_write import write_verified_store
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.writer import StoreWriter

N, C = 12, 5
OPTIONS: dict[str, Any] = {
    "num_samples": N,
    "num_classes": C,
    "encoding": "float32",
    "chunk_rows": 4,
}


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, C)).astype(np.float32)


def write_store(path: Path, rows: np.ndarray) -> Path:
    writer = create_store(path, labels=np.arange(N) % C, **OPTIONS)
    writer.write(np.arange(N), rows)
    writer.finalize()
    return path


def assert_untouched(out: Path, rows: np.ndarray) -> None:
    assert verify_store(out).ok
    assert np.array_equal(open_store(out).read_dense(np.arange(N)).numpy(), rows)
    assert sorted(path.name for path in out.parent.iterdir()) == [out.name]  # no staging left


def test_a_failing_fill_leaves_an_existing_output_as_it_was(tmp_path):
    old = logits(0)
    out = write_store(tmp_path / "out.zarr", old)

    def fill(writer: StoreWriter) -> None:
        writer.write(np.arange(4), logits(1)[:4])
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_verified_store(out, fill, overwrite=True, labels=np.arange(N) % C, **OPTIONS)
    assert_untouched(out, old)


def test_a_replacement_that_fails_verification_leaves_the_existing_output(tmp_path):
    old = logits(0)
    out = write_store(tmp_path / "out.zarr", old)

    def fill(writer: StoreWriter) -> None:
        writer.write(np.arange(N), logits(1))
        staging = tmp_path / "out.zarr.incoming"  # the replacement, built beside the store
        (staging / "labels" / "c" / "0").unlink()  # lost after writing: only verify can tell

    with pytest.raises(StoreCorruptError, match="failed verification"):
        write_verified_store(out, fill, overwrite=True, labels=np.arange(N) % C, **OPTIONS)
    assert_untouched(out, old)


def test_every_command_verifies_its_new_store_before_publishing_it(tmp_path, monkeypatch):
    verified: list[str] = []

    def spy(path, **options):
        verified.append(Path(path).name)
        return verify_store(path, **options)

    monkeypatch.setattr(verified_write, "verify_store", spy)
    first = write_store(tmp_path / "a.zarr", logits(0))
    second = write_store(tmp_path / "b.zarr", logits(1))
    convert_store(first, tmp_path / "half.zarr", encoding="float16")
    merge_stores([first, second], tmp_path / "merged.zarr")
    convert_store(first, tmp_path / "even.zarr", encoding="float32", indices=np.arange(0, N, 2))
    convert_store(first, tmp_path / "odd.zarr", encoding="float32", indices=np.arange(1, N, 2))
    concat_stores([tmp_path / "even.zarr", tmp_path / "odd.zarr"], tmp_path / "whole.zarr")
    rows = [(np.arange(N), logits(2))]
    write_new_store(tmp_path / "imported.zarr", rows, labels=np.arange(N) % C, **OPTIONS)
    made = ["half", "merged", "even", "odd", "whole", "imported"]
    assert verified == [f"{name}.zarr" for name in made]
    assert all(verify_store(tmp_path / f"{name}.zarr").ok for name in made)
