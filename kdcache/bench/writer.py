"""The store writer alone: rows/s per encoding against the number of writer threads.

``kdcache bench dump --writer-only`` runs :func:`bench_writer`. It writes teacher-like logits
(a few confident classes over a Gaussian rest, as a trained classifier's) through
:class:`~kdcache.store.write.background.BackgroundWriter`, the path a dump takes, into a fresh store
per run: checks, encoding, fidelity, compression, digests, fsync and chunk flags included. The
question it answers: how many writer threads keep up with a teacher that produces R rows/s
(docs/benchmarks.md, "Writer threads").
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.bench.feed import make_bench_folder, round_floats
from kdcache.errors import ConfigError
from kdcache.store.write.background import BackgroundWriter, default_writer_workers
from kdcache.store.write.writer import create_store

#: Distinct rows the benchmark cycles through: more than a chunk holds, so zstd finds no repeats.
_POOL_ROWS = 4096


def teacher_like_logits(
    num_rows: int, num_classes: int, *, seed: int = 0, views: int = 1
) -> np.ndarray:
    """Logits of a confident classifier: N(0, 2) over every class plus 6-12 on a few of them,
    the same few for the ``views`` consecutive rows of one sample (views of one image)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(num_rows, num_classes)).astype(np.float32)
    samples = -(-num_rows // views)
    for rank, boost in enumerate((12.0, 8.0, 6.0)):
        classes = np.repeat(rng.integers(0, num_classes, size=samples), views)[:num_rows]
        logits[np.arange(num_rows), classes] += boost - rank
    return logits


def _write_once(
    path: Path,
    pool: np.ndarray,
    *,
    encoding: str,
    workers: int,
    num_rows: int,
    batch_size: int,
    fsync: bool,
    views: int,
    store_rows: int,
) -> tuple[float, float]:
    """Wall-clock and CPU seconds (every thread of the process) to write the first ``num_rows``
    rows of a store of ``store_rows`` rows, and to finalize it when that is all of it."""
    writer = create_store(
        path,
        num_samples=store_rows // views,
        num_classes=pool.shape[1],
        encoding=encoding,
        fsync=fsync,
        views=views,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    with BackgroundWriter(writer, workers=workers) as background:
        for start in range(0, num_rows, batch_size):
            stop = min(start + batch_size, num_rows)
            first = start % len(pool)
            block = pool[first : first + stop - start]
            if len(block) < stop - start:  # wrap around the pool
                block = np.concatenate([block, pool[: stop - start - len(block)]])
            background.write(np.arange(start, stop), block)
    if num_rows == store_rows:
        writer.finalize()
    else:
        writer.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    shutil.rmtree(path)  # a float16 store of 65k x 1,000 rows is ~120 MB: keep one at a time
    return seconds, cpu_seconds


def bench_writer(
    *,
    encodings: Sequence[str] = ("float16", "int8", "topk:5"),
    workers: Sequence[int] | None = None,
    num_rows: int = 65_536,
    num_classes: int = 1000,
    batch_size: int = 256,
    repeats: int = 3,
    fsync: bool = True,
    path: str | None = None,
    views: int = 1,
    store_rows: int | None = None,
) -> dict[str, Any]:
    """Rows/s of the writer for each encoding and each number of writer threads.

    Runs are interleaved over ``repeats`` rounds (the order of the workers reversed every other
    round) and medians reported. ``rows_per_s`` is wall-clock throughput and ``speedup`` the
    median over rounds of the ratio to the first worker count's time in the same round.
    ``views=V`` writes ``num_rows / V`` samples of V views each (rows ``sample * V + view``, the
    views of one sample sharing their confident classes), as a dump with ``--views V`` does.
    ``store_rows`` (default ``num_rows``) makes those rows the first of a larger dump's store,
    left unfinished: the writer then samples the fidelity as sparsely as that dump would (at
    most ~65k rows of a store, kdcache.logits.fidelity), a per-row cost that only a small store
    pays in full.
    ``rows_per_cpu_s`` divides by the CPU time of every thread of the process (the writer's
    threads, zarr's and this loop's): on a machine shared with other jobs it moves less than the
    wall clock, and C cores reach at most C times it.
    """
    counts = list(workers) if workers else [default_writer_workers()]
    if (
        not encodings
        or any(n < 1 for n in counts)
        or num_rows < 1
        or batch_size < 1
        or views < 1
        or num_rows % views
        or (store_rows or num_rows) < num_rows
        or (store_rows or num_rows) % views
    ):
        raise ConfigError(
            f"bench writer needs encodings, worker counts >= 1 and rows >= 1 (a multiple of the "
            f"views, and at most the store's rows), got encodings {list(encodings)}, workers "
            f"{counts}, rows {num_rows}, store rows {store_rows}, batch size {batch_size}, views "
            f"{views}"
        )
    total = store_rows or num_rows
    pool = teacher_like_logits(min(_POOL_ROWS, num_rows), num_classes, views=views)
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    make_bench_folder(path)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-writer-", dir=path) as scratch:
        # Untimed: the first store of a process pays imports and zarr's event-loop start.
        _write_once(
            Path(scratch) / "warm-up.zarr",
            pool,
            encoding=encodings[0],
            workers=counts[0],
            num_rows=min(num_rows, max(views, 2 * batch_size - 2 * batch_size % views)),
            batch_size=batch_size,
            fsync=fsync,
            views=views,
            store_rows=min(num_rows, max(views, 2 * batch_size - 2 * batch_size % views)),
        )
        for round_index in range(max(1, repeats)):
            order = counts if round_index % 2 == 0 else counts[::-1]
            for encoding in encodings:
                for count in order:
                    seconds, cpu_seconds = _write_once(
                        Path(scratch) / f"r{round_index}-{encoding.replace(':', '')}-{count}.zarr",
                        pool,
                        encoding=encoding,
                        workers=count,
                        num_rows=num_rows,
                        batch_size=batch_size,
                        fsync=fsync,
                        views=views,
                        store_rows=total,
                    )
                    wall.setdefault((encoding, count), []).append(seconds)
                    cpu.setdefault((encoding, count), []).append(cpu_seconds)
    rows = []
    for encoding in encodings:
        base = wall[(encoding, counts[0])]
        for count in counts:
            times = wall[(encoding, count)]
            rows.append(
                round_floats(
                    {
                        "encoding": encoding,
                        "workers": count,
                        "rows_per_s": num_rows / statistics.median(times),
                        "rows_per_cpu_s": num_rows / statistics.median(cpu[(encoding, count)]),
                        "speedup": statistics.median(
                            b / t for b, t in zip(base, times, strict=True)
                        ),
                        "all_wall_s": [round(t, 4) for t in times],
                    }
                )
            )
    return round_floats(
        {
            "benchmark": "writer",
            "num_rows": num_rows,
            "num_classes": num_classes,
            "views": views,
            "store_rows": total,
            "batch_size": batch_size,
            "fsync": fsync,
            "repeats": max(1, repeats),
            "default_workers": default_writer_workers(),
            "runs": rows,
        }
    )
