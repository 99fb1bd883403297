"""Stores with V views per sample: rows sample*V+view, view_params, resume, verify, old stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from narrowing import dense, kdcache_record, present, zarr_array

from kdcache import create_store, open_store, verify_store
from kdcache.errors import ConfigError, StoreFormatError, StoreMismatchError
from kdcache.store.format.metadata import FORMAT_VERSION
from kdcache.store.tools.report import format_report, inspect_store

AUGMENT = {"recipe": "flip", "seed": 3, "fields": ["flip"], "input_size": [8, 8]}


def params(n: int, views: int) -> np.ndarray:
    return (np.arange(n * views, dtype=np.float32) % 2).reshape(n, views, 1)


def logits_of(rows: np.ndarray) -> np.ndarray:
    return np.random.default_rng(rows).normal(size=(rows.size, 5)).astype(np.float32)


def make(path, *, encoding="float32", n=11, views=3, **kwargs):
    return create_store(
        path,
        num_samples=n,
        num_classes=5,
        encoding=encoding,
        views=views,
        augment=AUGMENT,
        view_params=params(n, views),
        labels=np.arange(n) % 5,
        chunk_rows=6,
        **kwargs,
    )


@pytest.mark.parametrize("encoding", ["float32", "int8", "topk:2"])
def test_views_round_trip_in_any_encoding(tmp_path, encoding):
    writer = make(tmp_path / "s.zarr", encoding=encoding)
    rows = np.random.default_rng(0).permutation(33)
    all_logits = np.random.default_rng(1).normal(size=(33, 5)).astype(np.float32)
    for batch in np.array_split(rows, 4):
        writer.write(batch, all_logits[batch])
    writer.finalize()
    reader = open_store(tmp_path / "s.zarr")
    assert (reader.num_samples, reader.views, reader.num_rows) == (11, 3, 33)
    assert reader.metadata.format_version == FORMAT_VERSION
    assert reader.metadata.augment == AUGMENT
    logits, view_params = reader.read_views([4, 0], temperature=1.0)
    assert logits.shape == (2, 3, 5)
    assert present(view_params).shape == (2, 3, 1)
    expected = all_logits[[12, 13, 14, 0, 1, 2]].reshape(2, 3, 5)
    if encoding == "float32":
        assert torch.equal(logits, torch.from_numpy(expected))
    else:  # lossy: still each view's own row
        assert (logits.argmax(-1).numpy() == expected.argmax(-1)).all()
    np.testing.assert_array_equal(view_params, params(11, 3)[[4, 0]])
    # Plain zarr: row sample*V+view, view_params (N, V, P), the record in the attributes.
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert kdcache_record(group)["views"] == 3
    np.testing.assert_array_equal(zarr_array(group, "view_params")[:], params(11, 3))
    verified = verify_store(tmp_path / "s.zarr")
    assert verified.ok
    assert f": N=11 V=3 C=5 {encoding}, " in verified.lines()[0]


def test_a_resumed_store_with_views_must_keep_its_recipe(tmp_path):
    writer = make(tmp_path / "s.zarr")
    writer.write(np.arange(12), logits_of(np.arange(12)))  # two of six chunks
    writer.close()
    with pytest.raises(StoreMismatchError, match="augment"):
        create_store(
            tmp_path / "s.zarr",
            num_samples=11,
            num_classes=5,
            encoding="float32",
            views=3,
            augment={**AUGMENT, "seed": 4},
            view_params=params(11, 3),
            chunk_rows=6,
            resume=True,
        )
    with pytest.raises(StoreMismatchError, match="views"):
        make(tmp_path / "s.zarr", views=2, resume=True)
    # AUGMENT names no sampler, as stores drawn before counter-v1: this kdcache would draw the
    # missing views differently, so the resume is refused in one line.
    with pytest.raises(
        StoreMismatchError,
        match=r"its views were drawn by an older kdcache's generator but this dump draws with "
        "'counter-v1'.*pass --overwrite",
    ):
        create_store(
            tmp_path / "s.zarr",
            num_samples=11,
            num_classes=5,
            encoding="float32",
            views=3,
            augment={**AUGMENT, "sampler": "counter-v1"},
            view_params=params(11, 3),
            chunk_rows=6,
            resume=True,
        )
    resumed = make(tmp_path / "s.zarr", resume=True)
    np.testing.assert_array_equal(resumed.pending_indices(), np.arange(12, 33))
    resumed.write(np.arange(12, 33), logits_of(np.arange(12, 33)))
    resumed.finalize()
    report = verify_store(tmp_path / "s.zarr")
    assert report.ok
    assert report.chunks_checked == 6


def test_verify_names_damaged_view_params_and_rows(tmp_path):
    writer = make(tmp_path / "s.zarr")
    writer.write(np.arange(33), logits_of(np.arange(33)))
    writer.finalize()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    bad = params(11, 3)
    bad[7, 1, 0] = np.nan
    zarr_array(group, "view_params")[:] = bad
    problems = verify_store(tmp_path / "s.zarr").problems
    assert any("'view_params': NaN or Inf for samples 7" in p for p in problems), problems
    del group["view_params"]
    problems = verify_store(tmp_path / "s.zarr").problems
    assert any("'view_params' is missing" in p for p in problems), problems


def test_bad_view_params_are_refused_at_creation(tmp_path):
    with pytest.raises(ConfigError, match=r"shape \(11, 3, P\)"):
        create_store(
            tmp_path / "a.zarr", num_samples=11, num_classes=5, views=3, view_params=params(11, 2)
        )
    with pytest.raises(ConfigError, match="names 2 parameter fields"):
        create_store(
            tmp_path / "b.zarr",
            num_samples=11,
            num_classes=5,
            views=3,
            view_params=params(11, 3),
            augment={**AUGMENT, "fields": ["a", "b"]},
        )
    with pytest.raises(ConfigError, match="views must be an integer >= 1"):
        create_store(tmp_path / "c.zarr", num_samples=11, num_classes=5, views=0)


def test_a_store_written_before_views_still_loads(tmp_path):
    writer = create_store(tmp_path / "old.zarr", num_samples=7, num_classes=5, encoding="float32")
    writer.write(np.arange(7), logits_of(np.arange(7)))
    writer.finalize()
    # An older kdcache wrote neither field; format version 1.
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    record = {k: v for k, v in kdcache_record(group).items() if k not in ("views", "augment")}
    assert record["format_version"] == 1
    group.attrs["kdcache"] = record
    reader = open_store(tmp_path / "old.zarr")
    assert (reader.views, reader.num_rows, reader.view_params) == (1, 7, None)
    assert torch.equal(dense(reader.read([3])), torch.from_numpy(logits_of(np.arange(7))[[3]]))
    assert verify_store(tmp_path / "old.zarr").ok
    group.attrs["kdcache"] = {**record, "views": 0}
    with pytest.raises(StoreFormatError, match="views is 0"):
        open_store(tmp_path / "old.zarr")


def test_inspect_shows_views_recipe_and_bytes_per_view(tmp_path):
    writer = make(tmp_path / "s.zarr")
    writer.write(np.arange(33), logits_of(np.arange(33)))
    writer.finalize()
    report = inspect_store(tmp_path / "s.zarr")
    assert report.views == 3
    assert report.augment == AUGMENT
    assert report.bytes_per_view == pytest.approx(present(report.bytes_per_sample) / 3)
    text = format_report(report)
    assert "views (V):" in text
    assert "recipe 'flip' seed 3 (1 parameters per view, drawn by an older" in text
    assert "B/view" in text
    assert report.teacher_accuracy is not None  # every view against its sample's label
