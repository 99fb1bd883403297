"""One writer per store: real flock'ed lock files, a SIGKILLed holder, and S3 leases on a real
server."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import cli_environment
from narrowing import dense, present

from kdcache import create_store, open_store
from kdcache.errors import StoreLockedError
from kdcache.store.format.location import parse_location
from kdcache.store.write.locking import acquire_writer_lock

HOLD_LOCK = """
import sys, time
from kdcache import create_store
writer = create_store(sys.argv[1], num_samples=10, num_classes=2, chunk_rows=5)
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_at_once_and_the_first_keeps_going(tmp_path):
    first = create_store(
        tmp_path / "s.zarr", num_samples=10, num_classes=2, chunk_rows=5, encoding="float32"
    )
    first.write(np.arange(5), np.ones((5, 2)))
    modes: tuple[dict[str, Any], ...] = ({"resume": True}, {"overwrite": True})
    for options in modes:
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            create_store(
                tmp_path / "s.zarr",
                num_samples=10,
                num_classes=2,
                chunk_rows=5,
                encoding="float32",
                **options,
            )
    first.write(np.arange(5, 10), np.zeros((5, 2)))
    first.finalize()
    assert dense(open_store(tmp_path / "s.zarr").read([0, 9])).tolist() == [[1, 1], [0, 0]]
    assert not (tmp_path / "s.zarr.lock").exists()  # released on finalize


def test_a_sigkilled_writer_does_not_leave_the_store_locked(tmp_path):
    store = str(tmp_path / "s.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, store],
        env=cli_environment(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert present(holder.stdout).readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} "):
            create_store(store, num_samples=10, num_classes=2, chunk_rows=5, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "s.zarr.lock").exists()  # the file stays, but the kernel dropped the lock
    writer = create_store(store, num_samples=10, num_classes=2, chunk_rows=5, resume=True)
    assert writer.pending_indices().tolist() == list(range(10))
    writer.close()


def _write_lease(url: str, **fields) -> None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    fs.pipe_file(path, json.dumps(fields).encode())


def test_remote_writers_hold_a_lease_that_expires(s3_bucket):
    url = f"{s3_bucket}/t.zarr"
    writer = create_store(url, num_samples=10, num_classes=2, chunk_rows=5)
    with pytest.raises(StoreLockedError, match="lease until"):
        create_store(url, num_samples=10, num_classes=2, chunk_rows=5, resume=True)
    writer.close()
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    _write_lease(url + ".lock", owner="crashed", host="elsewhere", pid=1, expires_at=past)
    resumed = create_store(url, num_samples=10, num_classes=2, chunk_rows=5, resume=True)
    resumed.write(np.arange(10), np.ones((10, 2)))
    resumed.finalize()
    assert open_store(url).metadata.complete


def test_a_remote_writer_notices_that_its_lease_was_taken(s3_bucket):
    location = parse_location(f"{s3_bucket}/t.zarr")
    lock = acquire_writer_lock(location, lease_seconds=0.3)
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    _write_lease(
        f"{s3_bucket}/t.zarr.lock", owner="intruder", host="elsewhere", pid=2, expires_at=future
    )
    time.sleep(0.2)
    with pytest.raises(StoreLockedError, match=r"lost the write lease.*elsewhere"):
        lock.refresh()
    lock.release()  # must not delete the other writer's lease
    with pytest.raises(StoreLockedError, match="pid 2 on elsewhere"):
        acquire_writer_lock(location)
