"""The cost of fsync per chunk: StoreWriter alone (no teacher, no dataset), with and without it.

Usage: python pipelines/fsync_bench.py [--path DIR] [--num-samples N] [--num-classes C] [--rounds R]

Writes N x C random float32 logits as a float16 store into DIR (default: a temporary folder,
which should be on the disk you care about), R interleaved rounds each of ``fsync=True`` and
``fsync=False``, and prints the median seconds and rows/s of each, their ratio, and the number of
chunks (each fsynced chunk costs its files, their folders and its flag).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.store.write.writer import create_store


def write_once(path: Path, logits: np.ndarray, *, fsync: bool) -> tuple[float, int]:
    started = time.perf_counter()
    writer = create_store(
        path, num_samples=len(logits), num_classes=logits.shape[1], fsync=fsync, overwrite=True
    )
    for start in range(0, len(logits), 4096):
        writer.write(np.arange(start, min(start + 4096, len(logits))), logits[start : start + 4096])
    writer.finalize()
    return time.perf_counter() - started, writer.metadata.num_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path")
    parser.add_argument("--num-samples", type=int, default=65_536)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logits = np.random.default_rng(0).normal(size=(args.num_samples, args.num_classes))
    logits = logits.astype(np.float32)
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="kdcache-fsync-", dir=args.path) as scratch:
        for round_index in range(args.rounds):
            for fsync in (True, False) if round_index % 2 == 0 else (False, True):
                seconds, chunks = write_once(Path(scratch) / "t.zarr", logits, fsync=fsync)
                times[fsync].append(seconds)
    synced, unsynced = statistics.median(times[True]), statistics.median(times[False])
    print(
        json.dumps(
            {
                "num_samples": args.num_samples,
                "num_classes": args.num_classes,
                "chunks": chunks,
                "fsync_s": round(synced, 3),
                "no_fsync_s": round(unsynced, 3),
                "fsync_rows_per_s": round(args.num_samples / synced),
                "no_fsync_rows_per_s": round(args.num_samples / unsynced),
                "fsync_over_no_fsync": round(synced / unsynced, 3),
                "fsync_ms_per_chunk": round(1000 * (synced - unsynced) / chunks, 2),
                "all_fsync_s": [round(t, 3) for t in times[True]],
                "all_no_fsync_s": [round(t, 3) for t in times[False]],
            }
        )
    )


if __name__ == "__main__":
    main()
