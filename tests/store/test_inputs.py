"""Bad input ends in one line, before anything is written: store paths, sizes, metadata values."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from kdcache import create_store, open_store
from kdcache.errors import ConfigError, StoreFormatError, StoreMismatchError


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "store path is empty"),
        ("file://", "names no path"),
        ("http://example.com/t.zarr", "read-only http:// URL"),
    ],
)
def test_store_paths_that_cannot_be_written_are_refused(path, message):
    with pytest.raises(ConfigError, match=message):
        create_store(path, num_samples=4, num_classes=2)


def test_a_store_inside_another_store_is_refused(tmp_path):
    create_store(tmp_path / "s.zarr", num_samples=4, num_classes=2).close()
    with pytest.raises(ConfigError, match="lies inside the Zarr store"):
        create_store(tmp_path / "s.zarr" / "logits" / "x.zarr", num_samples=4, num_classes=2)
    assert not (tmp_path / "s.zarr" / "logits" / "x.zarr").exists()


def test_sizes_no_store_could_hold_are_refused_and_huge_chunks_clamped(tmp_path):
    with pytest.raises(ConfigError, match="num_samples must be an integer from 1"):
        create_store(tmp_path / "a.zarr", num_samples=2**50, num_classes=2)
    with pytest.raises(ConfigError, match="use chunk_rows <="):
        create_store(tmp_path / "b.zarr", num_samples=10**6, num_classes=1000, chunk_rows=10**6)
    assert not (tmp_path / "a.zarr").exists()
    assert not (tmp_path / "b.zarr").exists()
    writer = create_store(tmp_path / "c.zarr", num_samples=5, num_classes=2, chunk_rows=10**20)
    assert writer.metadata.chunk_rows == 5  # one chunk holding every sample
    writer.close()


def _edit_record(path, **changes):
    document = json.loads((path / "zarr.json").read_text())
    document["attributes"]["kdcache"].update(changes)
    (path / "zarr.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 0}, "format_version is 0"),
        ({"num_samples": "12"}, "num_samples is '12'"),
        ({"chunk_rows": 0}, "chunk_rows is 0"),
        ({"encoding": "float64"}, "encoding is 'float64'"),
        ({"complete": "yes"}, "complete is 'yes'"),
        ({"fidelity": {"temperatures": [1], "mean_kl": []}}, "fidelity is"),
    ],
)
def test_metadata_is_validated_by_one_schema_at_open(tmp_path, changes, message):
    path = tmp_path / "s.zarr"
    writer = create_store(path, num_samples=12, num_classes=3, chunk_rows=4)
    writer.write(np.arange(12), np.ones((12, 3)))
    writer.finalize()
    _edit_record(path, **changes)
    with pytest.raises(StoreFormatError, match=message):
        open_store(path)


def test_a_refused_resume_names_only_the_part_that_differs(tmp_path):
    fingerprint = {"num_samples": 4, "labels_sha256": "a" * 64, "inputs_sha256": "b" * 64}
    options: dict[str, Any] = dict(num_samples=4, num_classes=2, chunk_rows=2)
    create_store(
        tmp_path / "s.zarr", dataset={"spec": "x", "fingerprint": fingerprint}, **options
    ).close()
    changed = {**fingerprint, "labels_sha256": "c" * 64}
    with pytest.raises(StoreMismatchError) as refused:
        create_store(
            tmp_path / "s.zarr",
            dataset={"spec": "x", "fingerprint": changed},
            resume=True,
            **options,
        )
    message = str(refused.value)
    assert "dataset.fingerprint.labels_sha256 is 'aaaa" in message
    assert "inputs_sha256" not in message
    assert "\n" not in message
