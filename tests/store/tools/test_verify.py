"""kdcache verify on real stores with flipped bytes, lost chunks, NaN rows and broken metadata."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import assert_one_line_error, run_cli
from narrowing import zarr_array

from kdcache import create_store, open_store
from kdcache.errors import StoreCorruptError
from kdcache.store.tools.verify import verify_store


@pytest.fixture
def store(tmp_path):
    """A complete float32 store of 95 rows in chunks of 10, with labels."""
    path = tmp_path / "s.zarr"
    logits = np.random.default_rng(0).normal(size=(95, 5)).astype(np.float32)
    writer = create_store(
        path,
        num_samples=95,
        num_classes=5,
        encoding="float32",
        chunk_rows=10,
        labels=np.arange(95) % 5,
    )
    writer.write(np.arange(95), logits)
    writer.finalize()
    return path


def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_sound_store_passes(store):
    report = verify_store(store)
    assert report.ok
    assert report.chunks_checked == 10
    assert report.lines()[0].endswith(": N=95 C=5 float32, 10 chunks decoded")
    assert report.lines()[-1] == "OK"


def test_flipped_bytes_are_reported_as_sample_ranges_by_verify_and_distill_reads(store):
    flip_byte(store / "logits/c/3/0")
    flip_byte(store / "logits/c/9/0", 0.2)  # the short last chunk: samples 90-94
    report = verify_store(store)
    assert not report.ok
    assert report.problems == (
        "array 'logits': chunks fail their checksum or do not decode for samples 30-39, 90-94",
    )
    with pytest.raises(StoreCorruptError, match="samples 30-39"):
        open_store(store).load()
    assert report.lines()[-1] == "FAILED: 1 problem"
    with pytest.raises(StoreCorruptError, match=r"with 1 problem, first: .*30-39"):
        report.raise_if_bad()


def test_lost_chunks_nan_rows_and_metadata_mismatches_are_reported(store):
    (store / "logits/c/2/0").unlink()
    group = zarr.open_group(str(store), mode="r+")
    zarr_array(group, "logits")[41] = np.nan  # bypasses the writer's check, as another tool could
    zarr_array(group, "logits")[77, 2] = np.inf
    del group["labels"]
    group.create_array("labels", shape=(94,), dtype="int64", fill_value=-1)
    problems = "\n".join(verify_store(store).problems)
    assert "chunks marked written are missing for samples 20-29" in problems
    assert "NaN or Inf in 2 rows, samples 41, 77" in problems
    assert "array 'labels' has shape (94,), expected (95,)" in problems


def test_labels_that_contradict_the_fingerprint_and_a_missing_array(tmp_path):
    path = tmp_path / "s.zarr"
    writer = create_store(
        path,
        num_samples=4,
        num_classes=3,
        chunk_rows=2,
        labels=[0, 1, 2, 0],
        dataset={
            "spec": "x",
            "fingerprint": {"num_samples": 4, "num_classes": 3, "labels_sha256": "0" * 64},
        },
    )
    writer.write(np.arange(4), np.ones((4, 3)))
    writer.finalize()
    assert "stored labels do not match the dataset fingerprint" in verify_store(path).problems[0]
    del zarr.open_group(str(path), mode="r+")["logits"]
    assert "array 'logits' required by encoding 'float16' is missing" in "\n".join(
        verify_store(path).problems
    )


def test_an_unfinished_store_fails_verification_with_its_progress(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=30, num_classes=2, chunk_rows=10)
    writer.write(np.arange(10, 20), np.ones((10, 2)))
    writer.close()
    report = verify_store(tmp_path / "s.zarr")
    assert report.problems == (
        "unfinished dump: 1 of 3 chunks (10 of 30 samples, 33%) written; "
        "finish it with `kdcache dump-teacher --resume`",
    )
    assert report.chunks_checked == 1


def test_verify_command_exits_non_zero_on_damage(store):
    flip_byte(store / "logits/c/0/0")
    result = run_cli("verify", str(store), check=False)
    assert (
        "problem: array 'logits': chunks fail their checksum or do not decode for samples 0-9"
        in result.stdout
    )
    assert_one_line_error(result, "failed verification", "samples 0-9")
