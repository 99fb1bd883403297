"""Cost of the trust and sharing features: verify, pack, and reading from a folder, a zip and S3.

    PYTHONPATH=. python pipelines/sharing_bench.py --out /tmp/kdcache-sharing
    PYTHONPATH=. python pipelines/sharing_bench.py --out /tmp/kdcache-sharing --s3   # + moto server

Writes one float16 store of N x C Gaussian logits through the public API, then times
``verify_store``, ``pack_store`` and a full ``open_store(...).load()`` from each location, and
prints a Markdown table (docs/benchmarks.md holds a run's output). ``--s3`` starts moto's S3
server on 127.0.0.1 (the test extra) to time the same store written to and read from s3://.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import create_store, open_store, pack_store, verify_store


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def write_store(location: str, logits: np.ndarray, *, encoding: str) -> None:
    with create_store(
        location, num_samples=len(logits), num_classes=logits.shape[1], encoding=encoding
    ) as writer:
        for start in range(0, len(logits), 16384):
            writer.write(
                np.arange(start, min(start + 16384, len(logits))), logits[start : start + 16384]
            )
        writer.finalize()


def load(location: str) -> None:
    open_store(location).load()


def start_s3() -> tuple[Any, str]:
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    s3fs.S3FileSystem().mkdir("kdcache-bench")
    return server, "s3://kdcache-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Scratch folder (replaced).")
    parser.add_argument("--num-samples", type=int, default=200_000)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--encoding", default="float16")
    parser.add_argument(
        "--s3", action="store_true", help="Also time a store on a local moto S3 server."
    )
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    logits = (
        np.random.default_rng(0)
        .normal(size=(args.num_samples, args.num_classes))
        .astype(np.float32)
        * 3
    )
    folder, packed = str(args.out / "t.zarr"), str(args.out / "t.zip")
    mib = logits.shape[0] * logits.shape[1] * np.dtype(args.encoding).itemsize / 2**20

    rows = [
        (
            "write (create_store, write, finalize)",
            folder,
            timed(lambda: write_store(folder, logits, encoding=args.encoding))[0],
        )
    ]
    seconds, report = timed(lambda: verify_store(folder))
    assert report.ok, report.problems
    rows.append(("verify_store", folder, seconds))
    rows.append(("pack_store", packed, timed(lambda: pack_store(folder, packed))[0]))
    rows.append(("verify_store", packed, timed(lambda: verify_store(packed))[0]))
    rows.append(("open_store + load", folder, timed(lambda: load(folder))[0]))
    rows.append(("open_store + load", packed, timed(lambda: load(packed))[0]))
    if args.s3:
        server, bucket = start_s3()
        try:
            url = f"{bucket}/t.zarr"
            rows.append(
                (
                    "write (create_store, write, finalize)",
                    url,
                    timed(lambda: write_store(url, logits, encoding=args.encoding))[0],
                )
            )
            rows.append(("verify_store", url, timed(lambda: verify_store(url))[0]))
            rows.append(("open_store + load", url, timed(lambda: load(url))[0]))
        finally:
            server.stop()

    print(
        f"N={args.num_samples:,} C={args.num_classes} {args.encoding} ({mib:.1f} MiB of logits)\n"
    )
    print("| operation | store | seconds | MiB/s |\n|---|---|---|---|")
    for operation, where, seconds in rows:
        kind = (
            "s3://"
            if where.startswith("s3://")
            else ("zip" if where.endswith(".zip") else "folder")
        )
        print(f"| {operation} | {kind} | {seconds:.2f} | {mib / seconds:,.0f} |")


if __name__ == "__main__":
    main()
