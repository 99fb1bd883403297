"""A store writer that encodes, compresses and writes in background threads.

During a dump the teacher's next forward pass runs while earlier batches' logits are being
encoded, compressed and written: :meth:`BackgroundWriter.write` only queues the batch (after
starting its device-to-host copy) and returns. ``workers`` threads take batches from the queue
and call :meth:`StoreWriter.write`, which is safe to call concurrently; numpy, zstd and file
writes release the GIL, so the threads share the cores (zarr's single event-loop thread and the
GIL-held part of each chunk write limit them: docs/benchmarks.md, "Writer threads"). The queue
is bounded, so at most ``max_pending`` batches wait in memory and a slow disk slows the dump
instead of filling RAM. An error in a background thread (non-finite logits, a full disk) is
raised again, unchanged, by the next ``write`` or by ``close``, so the CLI still prints its one
line. Chunks written before the error stay durable and the dump stays resumable: the threads
only ever call :meth:`StoreWriter.write`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError
from kdcache.logits.reduced import DrawnRows, ReducedRows
from kdcache.store.write.writer import StoreWriter

__all__ = [
    "BackgroundWriter",
    "default_writer_workers",
]

#: Batches that may wait for each background thread before ``write`` blocks.
_PENDING_PER_WORKER = 2
#: At most this many writer threads by default: the speed-up per added thread shrinks (zarr's
#: one event-loop thread, the GIL), and more threads only take cores from the DataLoader.
_MAX_DEFAULT_WORKERS = 8
_STOP = object()


def _to_host(values: torch.Tensor, *, copy: bool = True) -> tuple[torch.Tensor, Any]:
    """A host copy of ``values``: from a CUDA device into pinned memory without blocking (with
    the event that marks its arrival), else a plain copy (the caller may reuse its buffer), or
    with ``copy=False`` the host tensor itself."""
    values = values.detach()
    if values.device.type != "cuda":
        return (values.clone() if copy else values), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def default_writer_workers() -> int:
    """Writer threads for this process: a quarter of its cores (shared among the processes of a
    torchrun node), between 1 and :data:`_MAX_DEFAULT_WORKERS`.

    How many rows/s each encoding reaches per thread, and how many threads a fast teacher needs,
    is measured in docs/benchmarks.md ("Writer threads").
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(_MAX_DEFAULT_WORKERS, (cores or 1) // (4 * max(1, local_processes))))


class BackgroundWriter:
    """Wraps a :class:`StoreWriter`; use as a context manager, or call :meth:`close` when done.

    ``workers`` threads write (default :func:`default_writer_workers`); ``max_pending`` batches
    may wait (default two per worker). ``close`` waits for every queued batch and re-raises the
    first background error; the caller then calls ``writer.finalize()`` as usual.
    """

    def __init__(
        self, writer: StoreWriter, *, workers: int | None = None, max_pending: int | None = None
    ) -> None:
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise ConfigError(f"writer workers must be an integer >= 1, got {workers!r}")
        self.writer = writer
        self.workers = workers or default_writer_workers()
        pending = max_pending if max_pending is not None else _PENDING_PER_WORKER * self.workers
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, pending))
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"kdcache-writer-{n}", daemon=True)
            for n in range(self.workers)
        ]
        self._started = False
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing: the caller will see the first error
            indices, logits, ready = item
            try:
                if ready is not None:
                    ready.synchronize()  # the non-blocking device-to-host copy has landed
                if isinstance(logits, ReducedRows | DrawnRows):
                    self.writer.write_reduced(indices, logits)
                else:
                    self.writer.write(indices, logits)
            except BaseException as error:  # handed to the main thread as is
                with self._error_lock:
                    if self._error is None:
                        self._error = error

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            if self._started:
                # Each thread takes one stop mark after draining what is queued before it.
                for _ in self._threads:
                    self._queue.put(_STOP)
                for thread in self._threads:
                    thread.join()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._stop()
            error, self._error = self._error, None
            raise error

    def write(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        logits: np.ndarray | torch.Tensor,
        *,
        copy: bool = True,
    ) -> None:
        """Queue raw logits ``(B, C)`` for the sample indices ``(B,)``; blocks only when the queue
        is full. The rows are copied first, so the caller may reuse their buffer, unless
        ``copy=False``: then the caller hands them over and must not change them (a dump's
        freshly computed rows: a copy of a batch of V-wide rows costs the main thread a few
        percent of a CPU teacher's forward)."""
        rows = self._start(indices)
        ready = None
        if isinstance(logits, torch.Tensor):
            logits, ready = _to_host(logits, copy=copy)
        else:
            logits = np.array(logits, copy=True) if copy else np.asarray(logits)
        self._queue.put((rows, logits, ready))
        self._raise_pending_error()

    def write_reduced(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, reduced: ReducedRows | DrawnRows
    ) -> None:
        """Queue rows reduced on the teacher's device (:func:`kdcache.logits.reduced.reduce_rows`)
        for the sample indices ``(B,)``: only the reduced tensors are copied to the host."""
        rows = self._start(indices)
        parts: dict[str, Any] = {}
        ready = None
        for field in dataclasses.fields(reduced):
            part = getattr(reduced, field.name)
            if isinstance(part, torch.Tensor):
                part, ready = _to_host(part)  # copies queue in order: the last event covers all
            elif isinstance(part, np.ndarray):
                part = np.array(part, copy=True)
            parts[field.name] = part
        self._queue.put((rows, dataclasses.replace(reduced, **parts), ready))
        self._raise_pending_error()

    def _start(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Check that a write may be queued, start the threads, and copy the indices."""
        self._raise_pending_error()
        if self._closed:
            raise RuntimeError("BackgroundWriter.write called after close()")
        if not self._started:
            for thread in self._threads:
                thread.start()
            self._started = True
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        # A copy: the caller may reuse its buffer.
        return np.array(indices, dtype=np.int64).reshape(-1)

    def close(self) -> None:
        """Wait until every queued batch is written; re-raise the first background error."""
        self._stop()
        self._raise_pending_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
            return
        # The caller already fails: still write what is queued (those chunks make a resume
        # shorter), but let the caller's exception win over a background one.
        with contextlib.suppress(BaseException):
            self.close()
