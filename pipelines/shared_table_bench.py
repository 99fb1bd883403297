"""Memory of K processes reading one store in memory: K private tables vs one shared table.

Usage: python pipelines/shared_table_bench.py [--num-samples N] [--num-classes C] [--readers 1,2,4]

Writes a float16 store of N x C random logits, then for each K starts K reader processes that
open it and load it into memory, privately (each decodes its own copy, as one process does) or
shared (kdcache.store.read.shared_table: one copy per machine). Once all K hold their table, each
reports its peak RSS (ru_maxrss) and its proportional set size (PSS: shared pages divided
between the processes that map them). The sum of PSS is what the K readers cost the machine;
per-process RSS counts a shared table once in every process that maps it. Prints one JSON line
per (mode, K) and a Markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(store: str, shared: bool, gate: Path, count: int) -> None:
    from kdcache.store.read.reader import open_store

    reader = open_store(store)
    reader.feed.load(shared=shared)
    rows = np.random.default_rng(os.getpid()).integers(0, reader.num_samples, size=(50, 256))
    for batch in rows:  # a few batches of training-like random reads
        reader.read(batch)
    (gate / str(os.getpid())).touch()
    while len(list(gate.iterdir())) < count:  # measure while every reader holds its table
        time.sleep(0.01)
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split()[:2]
        rollup[name.rstrip(":")] = int(value) * 1024
    print(
        json.dumps(
            {
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss": rollup["Rss"],
                "pss": rollup["Pss"],
            }
        )
    )
    time.sleep(1.0)  # the others measure before this one lets go of the table


def measure(store: str, shared: bool, count: int, scratch: Path) -> dict:
    gate = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    readers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", store, str(int(shared)), str(gate), str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    reports = []
    for process in readers:
        stdout, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a reader failed ({process.returncode})")
        reports.append(json.loads(stdout))
    return {
        "mode": "shared" if shared else "private",
        "readers": count,
        "max_peak_rss_mb": max(r["peak_rss"] for r in reports) / 1e6,
        "sum_peak_rss_mb": sum(r["peak_rss"] for r in reports) / 1e6,
        "sum_pss_mb": sum(r["pss"] for r in reports) / 1e6,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--readers", default="1,2,4")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        store, shared, gate, count = args.worker
        worker(store, shared == "1", Path(gate), int(count))
        return

    from kdcache.store.write.writer import create_store

    with tempfile.TemporaryDirectory(prefix="kdcache-shared-bench-") as scratch:
        store = str(Path(scratch) / "t.zarr")
        writer = create_store(
            store, num_samples=args.num_samples, num_classes=args.num_classes, fsync=False
        )
        rng = np.random.default_rng(0)
        block = 8192
        for start in range(0, args.num_samples, block):
            stop = min(start + block, args.num_samples)
            writer.write(np.arange(start, stop), rng.normal(size=(stop - start, args.num_classes)))
        writer.finalize()
        table_mb = args.num_samples * args.num_classes * 2 / 1e6
        rows = []
        for count in (int(k) for k in args.readers.split(",")):
            for shared in (False, True):
                row = {"table_mb": table_mb, **measure(store, shared, count, Path(scratch))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(
        "\n| readers | mode | sum of PSS (MB) | peak RSS per reader (MB) | sum of peak RSS (MB) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['readers']} | {row['mode']} | {row['sum_pss_mb']:,.0f} | "
            f"{row['max_peak_rss_mb']:,.0f} | {row['sum_peak_rss_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
