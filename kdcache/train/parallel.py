"""Several distillation runs at once on one machine (``kdcache sweep --jobs J``).

A sweep's runs are independent, and one small student rarely fills a machine: J worker
processes (spawned, so no zarr or fsspec state crosses a fork) each run one setting at a time.
Every worker maps the one decoded table of the store that all of them share
(kdcache.store.read.shared_table), so J runs cost one table plus J interpreters, not J tables. Each
worker gets an equal share of the CPU cores for its torch threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from kdcache.config import DistillConfig
from kdcache.errors import KdcacheError, WorkerError
from kdcache.train.fit import RunResult

log = logging.getLogger("kdcache")


def _start_worker(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(message)s")


def run_concurrently(
    runs: Sequence[DistillConfig], *, jobs: int, task: Callable[[DistillConfig], RunResult]
) -> Iterator[tuple[DistillConfig, RunResult]]:
    """Yield ``(run, task(run))`` as runs finish, ``jobs`` at a time in worker processes.

    ``task`` must be a module-level function (it is sent to the workers by name). The first
    failure is raised once the runs already under way have ended, queued runs dropped: a
    :class:`~kdcache.errors.KdcacheError` as the worker raised it, anything else (a worker that
    could not start or died, a bug) as one :class:`~kdcache.errors.WorkerError` line naming the
    run.
    """
    if not runs:
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(
        max_workers=min(jobs, len(runs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads, logging.getLogger("kdcache").getEffectiveLevel()),
    )
    try:
        try:
            pending: dict[Future[RunResult], DistillConfig] = {
                pool.submit(task, run): run for run in runs
            }
        except (OSError, BrokenProcessPool) as error:
            raise WorkerError(
                f"cannot start {jobs} worker processes: {_first_line(error)}; free memory or "
                "processes, or run the sweep with --jobs 1"
            ) from None
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = pending.pop(future)
                yield run, _result(future, run)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[RunResult], run: DistillConfig) -> RunResult:
    """The run's result, or its failure as one line (the runs finished so far are kept)."""
    name = os.path.basename(run.out)
    try:
        return future.result()
    except KdcacheError:
        raise
    except BrokenProcessPool:
        raise WorkerError(
            f"{name}: its worker process died before finishing (it could not start, was killed, "
            "or ran out of memory); the finished runs are kept: run the sweep again to resume, "
            "with fewer --jobs"
        ) from None
    except Exception as error:
        raise WorkerError(
            f"{name} failed in its worker process: {type(error).__name__}: {_first_line(error)}; "
            "the finished runs are kept: run the sweep with --jobs 1 to see where it failed"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
