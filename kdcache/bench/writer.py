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

from kdcache.bench.feed import round_floats
from kdcache.errors import ConfigError
from kdcache.store.write.background import BackgroundWriter, default_writer_workers
from kdcache.store.write.writer import create_store

#: Distinct rows the benchmark cycles through: more than a chunk holds, so zstd finds no repeats.
_POOL_ROWS = 4096


def teacher_like_logits(num_rows: int, num_classes: int, *, seed: int = 0) -> np.ndarray:
    """Logits of a confident classifier: N(0, 2) over every class plus 6-12 on a few of them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(num_rows, num_classes)).astype(np.float32)
    for rank, boost in enumerate((12.0, 8.0, 6.0)):
        classes = rng.integers(0, num_classes, size=num_rows)
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
) -> float:
    """Seconds to write ``num_rows`` rows and finalize."""
    writer = create_store(
        path, num_samples=num_rows, num_classes=pool.shape[1], encoding=encoding, fsync=fsync
    )
    started = time.perf_counter()
    with BackgroundWriter(writer, workers=workers) as background:
        for start in range(0, num_rows, batch_size):
            stop = min(start + batch_size, num_rows)
            first = start % len(pool)
            block = pool[first : first + stop - start]
            if len(block) < stop - start:  # wrap around the pool
                block = np.concatenate([block, pool[: stop - start - len(block)]])
            background.write(np.arange(start, stop), block)
    writer.finalize()
    seconds = time.perf_counter() - started
    shutil.rmtree(path)  # a float16 store of 65k x 1,000 rows is ~120 MB: keep one at a time
    return seconds


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
) -> dict[str, Any]:
    """Rows/s of the writer for each encoding and each number of writer threads.

    Runs are interleaved over ``repeats`` rounds (the order of the workers reversed every other
    round) and medians reported. ``rows_per_s`` is wall-clock throughput and ``speedup`` the
    median over rounds of the ratio to the first worker count's time in the same round.
    """
    counts = list(workers) if workers else [default_writer_workers()]
    if not encodings or any(n < 1 for n in counts) or num_rows < 1 or batch_size < 1:
        raise ConfigError(
            f"bench writer needs encodings, worker counts >= 1 and rows >= 1, got encodings "
            f"{list(encodings)}, workers {counts}, rows {num_rows}, batch size {batch_size}"
        )
    pool = teacher_like_logits(min(_POOL_ROWS, num_rows), num_classes)
    wall: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-writer-", dir=path) as scratch:
        # Untimed: the first store of a process pays imports and zarr's event-loop start.
        _write_once(
            Path(scratch) / "warm-up.zarr",
            pool,
            encoding=encodings[0],
            workers=counts[0],
            num_rows=min(num_rows, 2 * batch_size),
            batch_size=batch_size,
            fsync=fsync,
        )
        for round_index in range(max(1, repeats)):
            order = counts if round_index % 2 == 0 else counts[::-1]
            for encoding in encodings:
                for count in order:
                    seconds = _write_once(
                        Path(scratch) / f"r{round_index}-{encoding.replace(':', '')}-{count}.zarr",
                        pool,
                        encoding=encoding,
                        workers=count,
                        num_rows=num_rows,
                        batch_size=batch_size,
                        fsync=fsync,
                    )
                    wall.setdefault((encoding, count), []).append(seconds)
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
            "batch_size": batch_size,
            "fsync": fsync,
            "repeats": max(1, repeats),
            "default_workers": default_writer_workers(),
            "runs": rows,
        }
    )
