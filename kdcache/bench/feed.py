"""The logit feed's benchmark (``kdcache bench feed``), and helpers every benchmark shares.

Each benchmark returns one JSON-ready dict. Torch's intra-op threads are set explicitly
(``threads``): oversubscribed threads on a small machine cost more than the work.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, KdcacheError
from kdcache.store.read.decoding import default_decode_threads
from kdcache.store.read.logit_feed import LogitFeed
from kdcache.store.read.reader import open_store
from kdcache.store.write.writer import create_store

#: Rows generated once and written repeatedly when a feed benchmark fills its store.
_FILL_BLOCK_ROWS = 1 << 14


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: all cores) and return the count."""
    count = threads or os.cpu_count() or 1
    if count < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(count)
    return count


def make_bench_folder(path: str | None) -> None:
    """Make the folder ``--path`` names (its parents too) for a benchmark's scratch stores."""
    if path is None:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"--path {path}: cannot make that folder ({error.strerror}); give a folder that "
            "exists or can be made"
        ) from None


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def round_floats(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with floats rounded to 6 significant digits, for reports.

    Significant digits rather than decimals: a duration of 0.05 s rounded to 4 decimals is off by
    up to 0.1 %, so a throughput derived from the unrounded figure would not match the printed one.
    """
    return {
        key: float(f"{value:.6g}") if isinstance(value, float) else value
        for key, value in values.items()
    }


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios: runs of one round share the machine's load of the moment."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=False))


def _feed_trial(
    path: str,
    mode: str,
    memory_budget: int,
    batch_size: int,
    max_batches: int | None,
    seed: int,
    threads: int,
    decode_threads: int | None = None,
) -> dict[str, Any]:
    """One feed mode in a fresh process, so peak RSS belongs to this mode alone."""
    torch.set_num_threads(threads)
    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    reader = open_store(path)
    feed = LogitFeed(
        reader,
        memory_budget=memory_budget,
        decode_threads=decode_threads or default_decode_threads(remote=reader.remote),
    )
    if feed.mode != mode:
        raise ConfigError(
            f"expected the {mode} feed mode for a budget of {memory_budget:,} bytes, "
            f"got {feed.mode}"
        )
    feed.load()
    open_s = time.perf_counter() - started
    # In memory any order is served; chunked, the feed's own epoch order is the random order.
    order = (
        np.random.default_rng(seed).permutation(feed.num_samples)
        if mode == "memory"
        else feed.epoch_order(0, seed=seed)
    )
    starts = range(0, feed.num_samples, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    started = time.perf_counter()
    rows = 0
    for start in starts:
        rows += feed.read(order[start : start + batch_size]).shape[0]
    elapsed = time.perf_counter() - started
    stored_rows_per_s = None
    if mode == "memory":
        # The same batches as stored (float16), not converted: the gather's own ceiling.
        started = time.perf_counter()
        for start in starts:
            feed.gather(order[start : start + batch_size])
        stored_rows_per_s = rows / (time.perf_counter() - started)
    return round_floats(
        {
            "mode": mode,
            "memory_budget_bytes": memory_budget,
            "open_s": open_s,
            "batches": len(starts),
            "samples_per_s": rows / elapsed,
            "stored_rows_samples_per_s": stored_rows_per_s,
            "batches_per_s": len(starts) / elapsed,
            "chunks_decoded": feed.chunks_decoded,
            "num_chunks": feed.num_chunks,
            "decode_threads": feed.decode_threads,
            # Chunked: decoded one window ahead of the epoch order, half the table's slots.
            "prefetch_chunks": feed.window_chunks if mode == "chunked" else 0,
            "table_bytes": feed.resident_nbytes,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    )


def _in_fresh_process(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``function(*args)`` run by a new interpreter (not a fork: its RSS starts from zero)."""
    package_root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import json, sys; from {function.__module__} import {function.__name__} as f; "
        "print(json.dumps(f(*json.loads(sys.argv[1]))))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise KdcacheError(f"the benchmark's child process failed: {last}")
    return json.loads(result.stdout.splitlines()[-1])


def bench_feed(
    *,
    num_samples: int = 1_000_000,
    num_classes: int = 1000,
    batch_size: int = 256,
    encoding: str = "float16",
    chunked_memory: int | None = None,
    max_batches: int | None = None,
    path: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    decode_threads: int | None = None,
) -> dict[str, Any]:
    """Write a store of random logits, then time random-order batches in both feed modes.

    The chunked mode gets ``chunked_memory`` bytes (default a quarter of the store, at least two
    chunks); each mode
    runs in its own fresh process, reporting open time, samples/s and peak RSS. Filling the store
    gives the synchronous writer's throughput (encode, check, compress, checksum, write).
    ``path`` may be a URL (``s3://bucket/feed.zarr``) to time the feed from a remote store;
    ``decode_threads`` is the feed's (default: its own).
    """
    threads = set_threads(threads)
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(
            f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}"
        )
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as scratch:
        store_path = path or str(Path(scratch) / "feed.zarr")
        writer = create_store(
            store_path,
            num_samples=num_samples,
            num_classes=num_classes,
            encoding=encoding,
            overwrite=True,
        )
        rng = np.random.default_rng(seed)
        # Whole chunks per write, the dump's fast path; one random block reused keeps setup cheap.
        block_rows = max(
            writer.metadata.chunk_rows,
            _FILL_BLOCK_ROWS // writer.metadata.chunk_rows * writer.metadata.chunk_rows,
        )
        block = rng.standard_normal((block_rows, num_classes), dtype=np.float32) * 3
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, num_samples, block_rows):
            stop = min(start + block_rows, num_samples)
            writer.write(np.arange(start, stop), block[: stop - start])
        writer.finalize()
        write_s, write_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        store_nbytes = writer.encoding.row_nbytes(num_classes) * num_samples
        chunk_nbytes = writer.encoding.row_nbytes(num_classes) * writer.metadata.chunk_rows
        budgets = {
            "memory": store_nbytes + 1,
            "chunked": chunked_memory or max(store_nbytes // 4, 2 * chunk_nbytes),
        }
        modes = {
            mode: _in_fresh_process(
                _feed_trial,
                store_path,
                mode,
                budget,
                batch_size,
                max_batches,
                seed,
                threads,
                decode_threads,
            )
            for mode, budget in budgets.items()
        }
    return {
        "benchmark": "feed",
        "num_samples": num_samples,
        "num_classes": num_classes,
        "batch_size": batch_size,
        "encoding": encoding,
        "threads": threads,
        "decoded_store_bytes": store_nbytes,
        "chunk_rows": writer.metadata.chunk_rows,
        # Per CPU-second of this process (all its threads): the writer's cost on one core, which a
        # busy machine's wall clock overstates.
        "writer_samples_per_s": round(num_samples / write_s, 1),
        "writer_samples_per_cpu_s": round(num_samples / write_cpu_s, 1),
        "modes": modes,
    }
