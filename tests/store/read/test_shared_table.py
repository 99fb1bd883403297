"""One decoded table per node: kdcache.store.read.shared_table with real stores and real
processes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_environment
from narrowing import present

from kdcache.store.read.reader import open_store
from kdcache.store.read.shared_table import SHARED_DIR_ENV, table_name
from kdcache.store.write.writer import create_store


def make_store(path, num_samples, num_classes, encoding="float16"):
    logits = np.random.default_rng(0).normal(size=(num_samples, num_classes)).astype(np.float32)
    writer = create_store(
        path, num_samples=num_samples, num_classes=num_classes, encoding=encoding, fsync=False
    )
    writer.write(np.arange(num_samples), logits)
    writer.finalize()
    return logits


def test_readers_share_one_table_and_the_last_one_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "shm"))
    make_store(tmp_path / "s.zarr", 300, 17, encoding="topk:4")
    first, second = open_store(tmp_path / "s.zarr"), open_store(tmp_path / "s.zarr")
    private = open_store(tmp_path / "s.zarr")
    folder = tmp_path / "shm" / table_name(str(tmp_path / "s.zarr"), first.metadata)
    first.feed.load(shared=True)
    second.feed.load(shared=True)
    assert first.feed.chunks_decoded > 0
    assert second.feed.chunks_decoded == 0
    rows = np.random.default_rng(1).integers(0, 300, size=64)
    for temperature in (1.0, 4.0):
        expected = private.read_dense(rows, temperature=temperature).numpy()
        for reader in (first, second):
            shared = reader.read_dense(rows, temperature=temperature)
            np.testing.assert_array_equal(shared, expected)
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(
        f"{name}.npy" for name in first.encoding.layout(17)
    )
    present(first.feed._shared).close()
    assert (folder / "ready").exists()  # still mapped by the second reader
    present(second.feed._shared).close()
    assert not (folder / "ready").exists()
    assert not list(folder.glob("*.npy*"))
    # A later reader builds it afresh.
    third = open_store(tmp_path / "s.zarr")
    third.feed.load(shared=True)
    np.testing.assert_array_equal(
        third.read_dense(rows, temperature=4.0), private.read_dense(rows, temperature=4.0)
    )


READER = """
import json, os, resource, sys, time
from pathlib import Path
from kdcache.store.read.reader import open_store

store, shared, gate, count = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3]), int(sys.argv[4])
reader = open_store(store)
reader.feed.load(shared=shared)
total = sum(float(t.reshape(-1)[:: 4096 // t.itemsize].sum()) for t in reader.feed._tables.values())
(gate / str(os.getpid())).touch()
while len(list(gate.iterdir())) < count:  # measure while every reader holds its table
    time.sleep(0.01)
table = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
current = ""
for line in Path("/proc/self/smaps").read_text().splitlines():
    parts = line.split()
    if "-" in parts[0] and not parts[0].endswith(":"):
        current = parts[-1] if len(parts) >= 6 else ""
    elif parts[0][:-1] in table and "kdcache-" in current:
        table[parts[0][:-1]] += int(parts[1]) * 1024
print(json.dumps(table))
time.sleep(0.5)  # let the other readers measure before this one unmaps
"""


def test_two_processes_hold_one_table_not_two(tmp_path):
    num_samples, num_classes = 8_000, 1000  # 16 MB of float16
    make_store(tmp_path / "s.zarr", num_samples, num_classes)
    nbytes = num_samples * num_classes * 2
    gate = tmp_path / "gate"
    gate.mkdir()
    env = cli_environment({SHARED_DIR_ENV: str(tmp_path / "shm")})
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(tmp_path / "s.zarr"), "1", str(gate), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = []
    for process in readers:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        reports.append(json.loads(stdout))
    for report in reports:
        assert report["Rss"] == pytest.approx(nbytes, rel=0.02)  # all of it mapped...
        assert report["Private_Clean"] + report["Private_Dirty"] < nbytes / 10  # ...not private
    # Proportional set size: the node holds the table once, not once per reader.
    assert sum(r["Pss"] for r in reports) == pytest.approx(nbytes, rel=0.05)
    assert not list((tmp_path / "shm").glob("*/*.npy"))  # the last reader removed it
