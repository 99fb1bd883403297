"""Opening stores from paths, URLs and zips: kdcache.store.format.location with real stores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from fsspec.core import url_to_fs
from narrowing import dense

from kdcache import DumpConfig, create_store, dump_teacher, open_store
from kdcache.errors import ConfigError, StoreFormatError, StoreNotFoundError
from kdcache.store.format.location import parse_location, partial_files
from kdcache.store.tools.pack import pack_store
from kdcache.store.tools.verify import verify_store


def finished_store(path, num_samples=30, num_classes=4, seed=0):
    logits = np.random.default_rng(seed).normal(size=(num_samples, num_classes)).astype(np.float32)
    writer = create_store(
        path, num_samples=num_samples, num_classes=num_classes, encoding="float32", chunk_rows=8
    )
    writer.write(np.arange(num_samples), logits)
    writer.finalize()
    return logits


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("out/t.zarr", "local", "out/t.zarr"),
        ("out/t.zarr/", "local", "out/t.zarr"),
        ("file:///data/t.zarr", "local", "/data/t.zarr"),
        ("t.ZIP", "zip", "t.ZIP"),
        ("s3://bucket/t.zarr", "remote", "s3://bucket/t.zarr"),
        ("memory://t.zarr", "remote", "memory://t.zarr"),
    ],
)
def test_locations_are_classified(text, kind, target):
    location = parse_location(text)
    assert (location.kind, location.target, str(location)) == (kind, target, text)


def test_an_unsupported_scheme_lists_the_supported_ones():
    with pytest.raises(
        ConfigError, match=r"unsupported store URL scheme 'ftpx'.*s3://.*gs://.*zip"
    ):
        open_store("ftpx://host/t.zarr")
    with pytest.raises(ConfigError, match="remote zip"):
        open_store("s3://bucket/t.zip")


def test_file_urls_and_plain_paths_open_the_same_store(tmp_path):
    logits = finished_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(
        dense(open_store(f"file://{tmp_path}/s.zarr").read(np.arange(30))).numpy(), logits
    )


def test_zip_stores_are_read_only_and_checked(tmp_path):
    with pytest.raises(ConfigError, match="kdcache pack"):
        create_store(tmp_path / "s.zip", num_samples=4, num_classes=2)
    assert not (tmp_path / "s.zip").exists()
    with pytest.raises(StoreNotFoundError, match="no store at"):
        open_store(tmp_path / "missing.zip")
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(StoreFormatError, match="not a zip file"):
        open_store(tmp_path / "fake.zip")


def test_memory_urls_hold_a_store_within_one_process():
    url = "memory://kdcache-test/s.zarr"
    logits = finished_store(url)
    assert dense(open_store(url).read([3])).numpy().tolist() == [logits[3].tolist()]


def test_resume_removes_a_killed_writers_temporary_files(tmp_path):
    writer = create_store(
        tmp_path / "s.zarr", num_samples=16, num_classes=2, chunk_rows=8, encoding="float32"
    )
    writer.write(np.arange(8), np.ones((8, 2), dtype=np.float32))
    writer.close()
    leftover = tmp_path / "s.zarr/logits/c/1/0.0123456789abcdef0123456789abcdef.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"torn")
    assert partial_files(parse_location(tmp_path / "s.zarr")) == [leftover]
    create_store(
        tmp_path / "s.zarr",
        num_samples=16,
        num_classes=2,
        chunk_rows=8,
        encoding="float32",
        resume=True,
    ).close()
    assert not leftover.exists()


def test_s3_store_round_trip_and_zip_of_it(s3_bucket, tmp_path):
    url = f"{s3_bucket}/teacher.zarr"
    logits = finished_store(url, num_samples=20, num_classes=3)
    reader = open_store(url)
    assert reader.where == url
    np.testing.assert_array_equal(dense(reader.read(np.arange(20))).numpy(), logits)
    packed = pack_store(url, tmp_path / "teacher.zip")
    np.testing.assert_array_equal(dense(open_store(packed.out).read(np.arange(20))).numpy(), logits)
    with pytest.raises(StoreNotFoundError, match="no store at"):
        open_store(f"{s3_bucket}/missing.zarr")


def test_dump_to_s3_then_distill_from_it_in_forked_workers(
    s3_server, s3_bucket, tmp_path, digits_teacher
):
    url = f"{s3_bucket}/teacher.zarr"
    dumped = dump_teacher(
        DumpConfig(
            teacher="cnn:8", weights=str(digits_teacher), out=url, device="cpu", chunk_rows=500
        )
    )
    assert dumped.num_samples == 1437
    assert dumped.bytes_on_disk is None
    report = verify_store(url)
    assert report.ok
    assert report.chunks_checked == 3
    fs, path = url_to_fs(url)
    assert not fs.exists(path + ".lock")  # the lease went away with the writer
    distilled = run_cli(
        "distill",
        "--student",
        "mlp:8",
        "--cache",
        url,
        "--epochs",
        "1",
        "--num-workers",
        "2",
        "--out",
        str(tmp_path / "run"),
        env=s3_server,
    )
    assert "best val_acc" in distilled.stdout
