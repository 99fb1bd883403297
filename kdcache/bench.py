"""Benchmarks behind ``kdcache bench``: the logit feed, the dump, and distillation from the cache.

Each function returns one JSON-ready dict. Timings that are compared are measured side by side
in one run, interleaved over ``repeats`` rounds, and reported as medians, because a shared
machine's noise is larger than the differences that matter. Torch's intra-op threads are set
explicitly (``threads``): oversubscribed threads on a small machine cost more than the work.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.datasets import build_dataset
from kdcache.dump import dump_teacher
from kdcache.errors import ConfigError, KdcacheError
from kdcache.models import build_model
from kdcache.runtime import make_loader, resolve_device
from kdcache.store.reader import open_store
from kdcache.store.writer import create_store
from kdcache.train.loop import distill, train

#: Rows generated once and written repeatedly when a feed benchmark fills its store.
_FILL_BLOCK_ROWS = 1 << 14


def _set_threads(threads: int | None) -> int:
    count = threads or os.cpu_count() or 1
    if count < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(count)
    return count


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: round(value, 4) if isinstance(value, float) else value for key, value in values.items()
    }


def _feed_trial(
    path: str,
    mode: str,
    memory_budget: int,
    batch_size: int,
    max_batches: int | None,
    seed: int,
    threads: int,
) -> dict[str, Any]:
    """One feed mode in a fresh process, so peak RSS belongs to this mode alone."""
    torch.set_num_threads(threads)
    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    feed = open_store(path, memory_budget=memory_budget).feed
    if feed.mode != mode:
        raise ConfigError(
            f"expected the {mode} feed mode for a budget of {memory_budget:,} bytes, got {feed.mode}"
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
    return _round(
        {
            "mode": mode,
            "memory_budget_bytes": memory_budget,
            "open_s": open_s,
            "batches": len(starts),
            "samples_per_s": rows / elapsed,
            "batches_per_s": len(starts) / elapsed,
            "chunks_decoded": feed.chunks_decoded,
            "num_chunks": feed.num_chunks,
            "table_bytes": feed.resident_nbytes,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    )


def _in_fresh_process(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``function(*args)`` run by a new interpreter (not a fork: its RSS starts from zero)."""
    package_root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import json, sys; from kdcache.bench import {function.__name__} as f; "
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
) -> dict[str, Any]:
    """Write a store of random logits, then time random-order batches in both feed modes.

    The chunked mode gets ``chunked_memory`` bytes (default a quarter of the store, at least two
    chunks); each mode
    runs in its own fresh process, reporting open time, samples/s and peak RSS. Filling the store
    gives the synchronous writer's throughput (encode, check, compress, checksum, write).
    """
    threads = _set_threads(threads)
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
                _feed_trial, store_path, mode, budget, batch_size, max_batches, seed, threads
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


def _timed(function: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - started


def _bare_forward(
    teacher: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> None:
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, device=device, shuffle=False
    )
    with torch.inference_mode():
        for inputs, _, _ in loader:
            teacher(inputs.to(device, non_blocking=True)).float().cpu()


def bench_dump(
    *,
    teacher: str = "resnet50",
    dataset: str = "fake:2048:32:1000",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    repeats: int = 3,
    encoding: str = "float16",
    threads: int | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """``dump_teacher`` against the bare teacher forward over the same loader, interleaved.

    The bare loop also moves the logits to the host, as any consumer of a forward pass must.
    ``dump_loop_s`` excludes the dump's setup (dataset labels and fingerprint, store creation);
    ratios are medians of the per-round ratios. Each round also dumps with ``fsync=False``:
    ``fsync_cost`` is the dump loop's time with fsync over its time without. ``path`` is the
    folder to dump into (the disk whose fsync is measured; default a temporary folder).
    """
    threads = _set_threads(threads)
    torch_device = resolve_device(device)
    data = build_dataset(dataset)
    model = (
        build_model(teacher, num_classes=data.num_classes, in_channels=data.in_channels)
        .to(torch_device)
        .eval()
    )
    bare, loop, wall, unsynced = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-", dir=path) as scratch:
        config = DumpConfig(
            teacher=teacher,
            dataset=dataset,
            out=str(Path(scratch) / "t.zarr"),
            encoding=encoding,
            batch_size=batch_size,
            num_workers=num_workers,
            device=str(torch_device),
            overwrite=True,
        )
        for round_index in range(max(1, repeats)):
            # Alternate which runs first, so neither always meets the machine warmer or busier.
            kinds = ("bare", "dump", "no-fsync")
            for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                if kind == "bare":
                    bare.append(
                        _timed(
                            lambda: _bare_forward(
                                model,
                                data,
                                batch_size=batch_size,
                                num_workers=num_workers,
                                device=torch_device,
                            ),
                            torch_device,
                        )
                    )
                elif kind == "no-fsync":
                    unsynced.append(dump_teacher(replace(config, fsync=False)).loop_time_s)
                else:
                    result = dump_teacher(config)
                    loop.append(result.loop_time_s)
                    wall.append(result.wall_time_s)
    bare_s, loop_s, wall_s = (
        statistics.median(bare),
        statistics.median(loop),
        statistics.median(wall),
    )
    return _round(
        {
            "benchmark": "dump",
            "teacher": teacher,
            "dataset": dataset,
            "num_samples": len(data),
            "num_classes": data.num_classes,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(torch_device),
            "threads": threads,
            "encoding": encoding,
            "repeats": len(bare),
            "bare_forward_s": bare_s,
            "dump_loop_s": loop_s,
            "dump_wall_s": wall_s,
            "dump_loop_over_bare": _paired_ratio(loop, bare),
            "dump_wall_over_bare": _paired_ratio(wall, bare),
            "bare_forward_samples_per_s": len(data) / bare_s,
            "dump_loop_samples_per_s": len(data) / loop_s,
            "dump_no_fsync_loop_s": statistics.median(unsynced),
            "fsync_cost": _paired_ratio(loop, unsynced),
            "all_bare_forward_s": bare,
            "all_dump_loop_s": loop,
            "all_dump_no_fsync_loop_s": unsynced,
        }
    )


def _paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios: runs of one round share the machine's load of the moment."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=False))


def _epoch_time(out: Path) -> float:
    """The last epoch's training time: earlier epochs pay worker start-up and autotuning."""
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["train_time_s"]


def _loader_only_time(
    dataset: Any, *, batch_size: int, num_workers: int, device: torch.device
) -> float:
    """Seconds for one pass of the same loader with no model: the input pipeline's own limit."""
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, device=device, shuffle=True
    )
    for _ in loader:  # start-up pass: workers, page cache
        pass
    started = time.perf_counter()
    for inputs, _, _ in loader:
        inputs.to(device, non_blocking=True)
    _sync(device)
    return time.perf_counter() - started


def _compute_only_saving(
    teacher: str,
    student: str,
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device,
    steps: int = 5,
) -> tuple[float, float]:
    """Median seconds of one teacher forward and of one CE student step on the same batch."""
    inputs = torch.stack([dataset[i % len(dataset)][0] for i in range(batch_size)]).to(device)
    labels = torch.randint(0, dataset.num_classes, (batch_size,), device=device)
    shape = dict(num_classes=dataset.num_classes, in_channels=dataset.in_channels)
    teacher_model = build_model(teacher, **shape).to(device).eval()
    student_model = build_model(student, **shape).to(device).train()
    optimizer = torch.optim.Adam(student_model.parameters())

    def forward() -> None:
        with torch.inference_mode():
            teacher_model(inputs)

    def step() -> None:
        loss = F.cross_entropy(student_model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    forward(), step()  # warm-up: allocator, cudnn autotuning
    teacher_s = statistics.median(_timed(forward, device) for _ in range(steps))
    student_s = statistics.median(_timed(step, device) for _ in range(steps))
    return teacher_s, student_s


def bench_distill(
    *,
    student: str = "resnet18",
    teacher: str = "resnet50",
    dataset: str = "fake:2048:32:100",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | None = None,
    repeats: int = 3,
    cache_memory: int | str | None = None,
    threads: int | None = None,
    epochs: int = 2,
) -> dict[str, Any]:
    """Runs of CE-only training, distillation from the cache and online KD, interleaved.

    Each run is the real ``train``/``distill`` (same student, data, loader and seed) for
    ``epochs`` epochs; the time compared is the last epoch's ``train_time_s`` (evaluation and
    start-up excluded). Ratios are medians of the
    per-round ratios. The compute-only saving is
    (teacher forward + student step) / student step, timed on one batch without a loader.
    """
    threads = _set_threads(threads)
    torch_device = resolve_device(device)
    data = build_dataset(dataset)
    teacher_s, student_s = _compute_only_saving(
        teacher, student, data, batch_size=batch_size, device=torch_device
    )
    times: dict[str, list[float]] = {"ce": [], "cache": [], "online": []}
    loader_s = _loader_only_time(
        data, batch_size=batch_size, num_workers=num_workers, device=torch_device
    )
    common = dict(
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        device=str(torch_device),
        overwrite=True,
    )
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as scratch:
        root = Path(scratch)
        store = str(root / "teacher.zarr")
        dump_teacher(
            DumpConfig(
                teacher=teacher,
                dataset=dataset,
                out=store,
                batch_size=batch_size,
                num_workers=num_workers,
                device=str(torch_device),
                overwrite=True,
            )
        )
        runs: dict[str, Callable[[Path], Any]] = {
            "ce": lambda out: train(
                TrainConfig(model=student, dataset=dataset, out=str(out), **common)
            ),
            "cache": lambda out: distill(
                DistillConfig(
                    student=student, cache=store, cache_memory=cache_memory, out=str(out), **common
                )
            ),
            "online": lambda out: distill(
                DistillConfig(
                    student=student, teacher=teacher, dataset=dataset, out=str(out), **common
                )
            ),
        }
        names = list(runs)
        for round_index in range(max(1, repeats)):
            # Rotate the order so no kind always runs first (warm caches) or last.
            for name in names[round_index % 3 :] + names[: round_index % 3]:
                out = root / f"{name}{round_index}"
                runs[name](out)
                times[name].append(_epoch_time(out))
    ce, cache, online = (statistics.median(times[name]) for name in ("ce", "cache", "online"))
    saving = (teacher_s + student_s) / student_s
    return _round(
        {
            "benchmark": "distill",
            "student": student,
            "teacher": teacher,
            "dataset": dataset,
            "num_samples": len(data),
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(torch_device),
            "threads": threads,
            "repeats": len(times["ce"]),
            "ce_epoch_s": ce,
            "cache_epoch_s": cache,
            "online_epoch_s": online,
            "cache_over_ce": _paired_ratio(times["cache"], times["ce"]),
            "online_over_cache": _paired_ratio(times["online"], times["cache"]),
            "teacher_forward_batch_s": teacher_s,
            "student_step_batch_s": student_s,
            "compute_only_saving": saving,
            "saving_fraction": _paired_ratio(times["online"], times["cache"]) / saving,
            "ce_samples_per_s": len(data) / ce,
            "cache_samples_per_s": len(data) / cache,
            "online_samples_per_s": len(data) / online,
            "loader_only_samples_per_s": len(data) / loader_s,
            "epochs_per_run": epochs,
            "all_epoch_s": times,
        }
    )
