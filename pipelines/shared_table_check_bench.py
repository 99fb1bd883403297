"""Cost of checking a shared table against decoding it: what attaching adds, per process.

Usage: python pipelines/shared_table_check_bench.py [--num-samples N] [--num-classes C] [--rounds R]

Writes a float16 store of N x C random logits, then per round times, in one process: a private
decode (``feed.load()``), building the shared table (decode, then sha256 of its bytes for its
record), attaching to it from a second reader (file checks, then sha256 of the bytes) and the
sha256 of the table alone. Prints one JSON line per round and a Markdown table
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure(store: str) -> dict[str, float]:
    """Seconds of one private decode, one shared build, one attach and one sha256 of the table."""
    from kdcache.store.read.reader import open_store

    private, builder, attacher = open_store(store), open_store(store), open_store(store)
    seconds = {
        "private_decode_s": timed(private.feed.load),
        "shared_build_s": timed(lambda: builder.feed.load(shared=True)),
        "attach_s": timed(lambda: attacher.feed.load(shared=True)),
    }
    table = builder.feed._tables["logits"]  # type: ignore[attr-defined]
    seconds["sha256_s"] = timed(lambda: hashlib.sha256(table.data).hexdigest())
    for reader in (builder, attacher):
        reader.feed._shared.close()  # type: ignore[attr-defined]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from kdcache.store.read.private_folder import SHARED_DIR_ENV
    from kdcache.store.write.writer import create_store

    with tempfile.TemporaryDirectory(prefix="kdcache-check-bench-") as scratch:
        os.environ.setdefault(SHARED_DIR_ENV, str(Path(scratch) / "shm"))
        store = str(Path(scratch) / "t.zarr")
        writer = create_store(
            store, num_samples=args.num_samples, num_classes=args.num_classes, fsync=False
        )
        rng = np.random.default_rng(0)
        for start in range(0, args.num_samples, 8192):
            stop = min(start + 8192, args.num_samples)
            writer.write(np.arange(start, stop), rng.normal(size=(stop - start, args.num_classes)))
        writer.finalize()
        rows = []
        for number in range(1, args.rounds + 1):
            row = {"round": number, "table_mb": args.num_samples * args.num_classes * 2 / 1e6}
            row.update(measure(store))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| round | private decode | shared build | attach (checks + sha256) | sha256 alone |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['round']} | {row['private_decode_s']:.2f} s | {row['shared_build_s']:.2f} s "
            f"| {row['attach_s']:.2f} s | {row['sha256_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
