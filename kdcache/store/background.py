"""A store writer that encodes, compresses and writes in a background thread.

During a dump the teacher's next forward pass runs while the previous batch's logits are being
compressed and written: :meth:`BackgroundWriter.write` only queues the batch (after starting its
device-to-host copy) and returns. The queue is bounded, so at most ``max_pending`` batches wait
in memory and a slow disk slows the dump instead of filling RAM. An error in the background
thread (non-finite logits, a full disk) is raised again, unchanged, by the next ``write`` or by
``close``, so the CLI still prints its one line. Chunks written before the error stay durable and
the dump stays resumable: the background thread only ever calls :meth:`StoreWriter.write`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from kdcache.store.writer import StoreWriter

#: Batches that may wait for the background thread before ``write`` blocks.
DEFAULT_MAX_PENDING = 4
_STOP = object()


class BackgroundWriter:
    """Wraps a :class:`StoreWriter`; use as a context manager, or call :meth:`close` when done.

    ``close`` waits for every queued batch and re-raises a background error; the caller then
    calls ``writer.finalize()`` as usual.
    """

    def __init__(self, writer: StoreWriter, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
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
                self.writer.write(indices, logits)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread as is
                self._error = error

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            if self._started:
                self._queue.put(_STOP)  # the thread drains the queue, so this cannot block forever
                self._thread.join()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._stop()
            error, self._error = self._error, None
            raise error

    def write(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor
    ) -> None:
        """Queue raw logits ``(B, C)`` for the sample indices ``(B,)``; blocks only when the queue
        is full."""
        self._raise_pending_error()
        if self._closed:
            raise RuntimeError("BackgroundWriter.write called after close()")
        if not self._started:
            self._thread.start()
            self._started = True
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        rows = np.array(indices, dtype=np.int64).reshape(
            -1
        )  # a copy: the caller may reuse its buffer
        ready = None
        if isinstance(logits, torch.Tensor):
            logits = logits.detach()
            if logits.device.type == "cuda":
                host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
                host.copy_(logits, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                logits = host
            else:
                logits = logits.clone()
        else:
            logits = np.array(logits, copy=True)
        self._queue.put((rows, logits, ready))
        self._raise_pending_error()

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
        try:
            self.close()
        except BaseException:  # noqa: BLE001
            pass
