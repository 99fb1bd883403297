"""The logit feed: teacher logits for any batch of sample indices, gathered from memory.

Zarr cannot serve random rows fast (each row costs a whole chunk's decompression, see
docs/benchmarks.md), so the feed keeps decoded chunks in a table of fixed-size slots in RAM and
gathers a batch with one ``np.take`` per array (no per-sample Python):

* **in-memory mode** when the whole store fits ``memory_budget``: every chunk is decoded once,
  up front (on the decoding threads), and any order of indices is served at memory speed;
* **chunked mode** for larger stores: a bounded least-recently-used set of chunks. Read in the
  order of :meth:`LogitFeed.epoch_order` (chunks shuffled, rows shuffled within a window of
  chunks, a new order each epoch, every index exactly once), each chunk is decompressed once per
  epoch and the table never exceeds the budget, whatever N is. While a batch reads window w,
  the decoding threads (kdcache.store.read.decoding) fill window w + 1's chunks into the slots
  window w - 1 left: the prefetch depth is one window, half the table.

A dense float16 store's rows reach float32 through torch in blocks of fewer than 32,768
elements: numpy's float16 conversion is several times slower, and torch's thread pool (which it
enters above that size) costs more than it saves while a training step holds the cores. On CUDA,
:meth:`LogitFeed.to_device` gathers into a small ring of pinned host buffers and copies with
``non_blocking=True``. DataLoader workers never need the feed (the training loop gathers in
the main process), but a reader handed to workers stays correct: a forked child reopens the Zarr
group (see :meth:`kdcache.store.read.reader.StoreReader.array`) and pickling drops the table.
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from kdcache.errors import ConfigError
from kdcache.logits.encodings import DenseEncoding
from kdcache.logits.sparse import SparseLogits, TeacherInput
from kdcache.store.read.decoding import (
    LOCAL_DECODE_THREADS,
    PLANS_KEPT,
    ChunkDecoder,
    EpochPlan,
)
from kdcache.store.read.shared_table import SharedTable, store_identity

if TYPE_CHECKING:
    from kdcache.logits.encodings import Encoding
    from kdcache.store.format.metadata import StoreMetadata

__all__ = [
    "FEED_MODES",
    "LOAD_BLOCK_CHUNKS",
    "Feed",
    "LogitFeed",
    "RowSource",
    "default_memory_budget",
    "parse_size",
]


class RowSource(Protocol):
    """What the feed needs of a store: its metadata and contiguous row reads (a StoreReader)."""

    metadata: StoreMetadata
    encoding: Encoding
    where: str

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def check_chunks_present(self, name: str) -> None: ...

    def check_unchanged(self) -> None: ...

    def content_digest(self) -> str: ...


#: Share of the memory available when the feed is built that it may use by default.
_DEFAULT_MEMORY_FRACTION = 0.5
#: Chunks decoded per read request when the whole store is loaded (big contiguous reads are
#: zarr's fast path); kdcache.store.tools.verify reads in blocks of the same size.
LOAD_BLOCK_CHUNKS = 64
#: Pinned host buffers cycled by :meth:`LogitFeed.to_device`; a buffer is reused only after its
#: copy finished, so this many batches may be in flight.
_PINNED_BUFFERS = 4
#: Elements converted to float32 per torch call: below torch's grain size (32,768), so torch
#: converts in the calling thread instead of waking its thread pool.
_CONVERT_BLOCK_ELEMENTS = 32_000

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size such as ``"512MiB"``, ``"8GB"`` or ``"1500000000"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"cannot read the memory size {value!r}; expected bytes or a number with a unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 8GiB"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"memory size must be at least 1 byte, got {value!r}; e.g. 8GiB")
    return size


def _available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller: the machine's figure stands
    return available


def default_memory_budget() -> int:
    return int(_available_memory() * _DEFAULT_MEMORY_FRACTION)


class Feed(ABC):
    """What the training loop, the samplers and the readers use of a logit feed: rows by sample
    index (:meth:`gather`, :meth:`read`, :meth:`read_dense`, :meth:`to_device`) and the order
    to read them in (:meth:`epoch_order`, :meth:`sampler`). :class:`LogitFeed` serves one store;
    :class:`~kdcache.store.read.joined.JoinedFeed` the parts of a joined store."""

    #: The store read: its metadata, encoding and name (``where``) for errors.
    reader: RowSource
    #: Rows the feed serves: samples, or every view of every sample (``sample * V + view``).
    num_samples: int
    #: Bytes of decoded chunks the feed may keep in RAM.
    memory_budget: int

    def __init__(self, reader: RowSource) -> None:
        self.reader = reader
        self._pinned: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._next_pinned = 0

    def __getstate__(self) -> dict:
        # Pinned buffers and their CUDA events stay in the process that made them.
        return {**self.__dict__, "_pinned": [], "_next_pinned": 0}

    @property
    @abstractmethod
    def mode(self) -> str:
        """``"memory"`` (every row decoded once, up front) or ``"chunked"`` (a bounded set of
        chunks, read best in :meth:`epoch_order`)."""

    @property
    @abstractmethod
    def resident_nbytes(self) -> int:
        """Bytes of decoded rows held in RAM now."""

    @property
    @abstractmethod
    def chunks_decoded(self) -> int:
        """Chunks decompressed since the feed was built (each once per epoch in feed order)."""

    @abstractmethod
    def load(self, *, shared: bool = False) -> None:
        """In-memory mode: decode every row now (idempotent). Chunked mode: nothing to do.
        ``shared=True`` maps tables that all processes on this machine share."""

    @abstractmethod
    def gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """The stored (still encoded) rows for ``indices``, one array per name in the layout."""

    @abstractmethod
    def epoch_order(
        self, epoch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """Every row index exactly once (rank ``rank``'s share of ``world_size``), in an order
        that differs per ``(seed, epoch)``."""

    def _rows(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise ConfigError(
                f"row indices must lie in [0, {self.num_samples}), got {rows.min()} to "
                f"{rows.max()}; "
                f"{self.reader.where} holds {self.num_samples} rows"
            )
        return rows

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TeacherInput:
        """The rows for the sample indices ``(B,)`` on the CPU, in the form the losses take:
        dense float32 ``(B, C)``, or :class:`~kdcache.logits.sparse.SparseLogits` for a ``topk:K``
        store (whose dense form would depend on the temperature, see :meth:`read_dense`)."""
        return self.reader.encoding.teacher(self.gather(indices))

    def read_dense(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Dense float32 logits ``(B, C)`` on the CPU; a ``topk:K`` store needs ``temperature``,
        the one its tail is filled for."""
        decoded = self.reader.encoding.decode(self.gather(indices), temperature=temperature)
        return torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32))

    def to_device(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, device: torch.device
    ) -> TeacherInput:
        """:meth:`read`, then onto ``device``; on CUDA dense rows go through pinned memory and
        are copied without blocking (sparse rows are a few bytes each)."""
        if device.type != "cuda":
            return self.read(indices).to(device)
        logits = self.read(indices)
        if isinstance(logits, SparseLogits):
            return logits.to(device)
        slot, host = self._pinned_buffer(logits.shape)
        host.copy_(logits)
        return self._send(slot, host, device)

    def _send(self, slot: int, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy pinned buffer ``slot`` (holding ``host``) to ``device`` without blocking."""
        result = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._pinned[slot] = (self._pinned[slot][0], event)
        return result

    def _pinned_buffer(self, shape: torch.Size) -> tuple[int, torch.Tensor]:
        numel = int(np.prod(shape))
        if len(self._pinned) < _PINNED_BUFFERS:
            self._pinned.append((torch.empty(0, dtype=torch.float32).pin_memory(), None))
        slot = self._next_pinned % len(self._pinned)
        self._next_pinned = slot + 1
        buffer, event = self._pinned[slot]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer must have left it
        if buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32).pin_memory()
            self._pinned[slot] = (buffer, None)
        return slot, buffer[:numel].view(shape)

    def sampler(self, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> _FeedSampler:
        """A DataLoader sampler that follows :meth:`epoch_order`, one epoch per iteration."""
        return _FeedSampler(self, seed=seed, rank=rank, world_size=world_size)


class LogitFeed(Feed):
    """Teacher logits by sample index, served from a bounded table of decoded chunks.

    Build it with :attr:`kdcache.store.read.reader.StoreReader.feed`
    (``open_store(path, memory_budget=...)``)
    rather than directly. ``memory_budget`` bounds the bytes of decoded chunks kept in RAM
    (default: half the available memory); ``mode`` forces ``"memory"`` or ``"chunked"``;
    ``decode_threads`` is how many chunks are decoded at once (default one per core; the
    reader of a remote store passes more, see kdcache.store.read.decoding).
    """

    def __init__(
        self,
        reader: RowSource,
        *,
        memory_budget: int | str | None = None,
        mode: str | None = None,
        decode_threads: int | None = None,
    ) -> None:
        super().__init__(reader)
        metadata = reader.metadata
        self.num_samples = metadata.num_rows
        self.num_classes = metadata.num_classes
        self.chunk_rows = metadata.chunk_rows
        self.num_chunks = metadata.num_chunks
        self._layout = reader.encoding.layout(metadata.num_classes)
        self.chunk_nbytes = reader.encoding.row_nbytes(metadata.num_classes) * self.chunk_rows
        self.store_nbytes = reader.encoding.row_nbytes(metadata.num_classes) * self.num_samples
        self.memory_budget = (
            default_memory_budget() if memory_budget is None else parse_size(memory_budget)
        )
        if mode is None:
            mode = "memory" if self.store_nbytes <= self.memory_budget else "chunked"
        residency = FEED_MODES.get(mode)
        if residency is None:
            raise ConfigError(f"unknown feed mode {mode!r}; valid modes: {', '.join(FEED_MODES)}")
        if decode_threads is not None and decode_threads < 1:
            raise ConfigError(f"decode_threads must be >= 1, got {decode_threads}")
        self.decode_threads = decode_threads or LOCAL_DECODE_THREADS
        self._residency = residency
        #: Chunk slots of the table.
        self.capacity = residency.capacity(self)
        #: Chunks per shuffling window: half the slots, so the window being finished and the next
        #: one fit together and no chunk is evicted before its window is done.
        self.window_chunks = max(1, self.capacity // 2)
        #: Dense float rows go through the float32 fast path of :meth:`read`.
        self._dense = isinstance(reader.encoding, DenseEncoding) and self._layout["logits"][1] in (
            np.float16,
            np.float32,
        )
        self._tables: dict[str, np.ndarray] | None = None
        self._shared: SharedTable | None = None
        self._reset_slots()
        self._chunks_decoded = 0

    def _reset_slots(self) -> None:
        self._slot_of_chunk = np.full(self.num_chunks, -1, dtype=np.int64)
        self._chunk_of_slot = np.full(self.capacity, -1, dtype=np.int64)
        self._last_used = np.full(self.capacity, -1, dtype=np.int64)
        #: Slots whose chunk is still being decoded (or decoded but not yet checked).
        self._decoding = np.zeros(self.capacity, dtype=bool)
        #: Slots decoded since the store was last seen unchanged (see _check_unchanged).
        self._unchecked = np.zeros(self.capacity, dtype=bool)
        self._tick = 0
        self._decoder: ChunkDecoder | None = None
        self._plans: dict[tuple[int, int, int, int], EpochPlan] = {}
        self._plan: EpochPlan | None = None
        self._lock = threading.Lock()
        self._scratch: tuple[np.ndarray, torch.Tensor] | None = None

    @property
    def mode(self) -> str:
        """``"memory"`` (the whole store decoded once) or ``"chunked"`` (a bounded set of
        chunks)."""
        return self._residency.name

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the slot table (allocated on first use); never more than the budget in chunked
        mode."""
        return 0 if self._tables is None else sum(table.nbytes for table in self._tables.values())

    @property
    def chunks_decoded(self) -> int:
        return self._chunks_decoded

    def __getstate__(self) -> dict:
        # A pickled feed (spawned DataLoader workers) starts empty instead of copying the table.
        state = {
            key: value
            for key, value in super().__getstate__().items()
            if key not in ("_decoder", "_lock", "_plans", "_plan", "_scratch")
        }
        state.update(_tables=None, _shared=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_slots()

    @property
    def decoder(self) -> ChunkDecoder:
        """The threads that decode chunks for this feed (started on first use)."""
        if self._decoder is None:
            self._decoder = ChunkDecoder(self._decode_into_slot, self.decode_threads)
        return self._decoder

    def load(self, *, shared: bool = False) -> None:
        """In-memory mode: decode the whole store now (idempotent). Chunked mode: nothing to do.

        ``shared=True`` maps the one decoded table of this store that all processes on this
        machine share (the first one decodes it, see kdcache.store.read.shared_table).
        """
        self._residency.load(self, shared=shared)

    def _check_and_decode_all(self, tables: dict[str, np.ndarray]) -> None:
        for name in self._layout:
            self.reader.check_chunks_present(name)
        self._decode_all(tables)

    def _decode_all(self, tables: dict[str, np.ndarray]) -> None:
        # Each thread decodes its own blocks, so about LOAD_BLOCK_CHUNKS chunks are in flight.
        block_chunks = max(1, LOAD_BLOCK_CHUNKS // self.decode_threads)
        block_rows = self.chunk_rows * block_chunks

        def decode_block(start: int) -> None:
            stop = min(start + block_rows, self.num_samples)
            for name, table in tables.items():
                table[start:stop] = self.reader.read_rows(name, start, stop)

        self.decoder.run_all(decode_block, range(0, self.num_samples, block_rows))
        try:
            self.reader.check_unchanged()  # every row above came from the store that was opened
        except Exception:
            self._tables = None
            raise
        self._slot_of_chunk[:] = np.arange(self.num_chunks)
        self._chunk_of_slot[:] = np.arange(self.num_chunks)
        self._chunks_decoded += self.num_chunks

    def _allocate(self, rows: int) -> None:
        for name in self._layout:
            self.reader.check_chunks_present(name)  # one listing per array, not one per chunk read
        self._tables = {
            name: np.empty((rows, *shape), dtype=dtype)
            for name, (shape, dtype) in self._layout.items()
        }

    def gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        rows = self._rows(indices)
        gathered = {
            name: np.empty((rows.size, *shape), dtype=dtype)
            for name, (shape, dtype) in self._layout.items()
        }
        with self._lock:
            for span, positions in self._residency.pieces(self, rows):
                assert self._tables is not None
                for name, table in self._tables.items():
                    # mode="clip" skips numpy's buffered bounds check: _rows checked them
                    np.take(table, positions, axis=0, out=gathered[name][span], mode="clip")
        return gathered

    def _gather_dense(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Dense float rows ``rows`` as float32 into ``out`` ((B, C), contiguous, on the CPU)."""
        target = out.numpy()
        with self._lock:
            for span, positions in self._residency.pieces(self, rows):
                assert self._tables is not None
                table = self._tables["logits"]
                if table.dtype == np.float32:
                    np.take(table, positions, axis=0, out=target[span], mode="clip")
                    continue
                scratch, converted = self._float16_scratch()
                step = len(scratch)
                for first in range(0, positions.size, step):
                    part = positions[first : first + step]
                    np.take(table, part, axis=0, out=scratch[: part.size], mode="clip")
                    start = span.start + first
                    out[start : start + part.size].copy_(converted[: part.size])
        return out

    def _float16_scratch(self) -> tuple[np.ndarray, torch.Tensor]:
        if self._scratch is None:
            rows = max(1, _CONVERT_BLOCK_ELEMENTS // self.num_classes)
            scratch = np.empty((rows, self.num_classes), dtype=np.float16)
            self._scratch = (scratch, torch.from_numpy(scratch))
        return self._scratch

    def _resident_positions(self, rows: np.ndarray) -> np.ndarray:
        """Chunked mode: make the chunks of ``rows`` (at most :attr:`capacity` of them) resident,
        start decoding the windows ahead, and return the rows' positions in the table."""
        chunks = rows // self.chunk_rows
        touched = np.unique(chunks)
        self._tick += 1
        self._collect_finished()
        self._request(touched, protected=touched, needed=True)
        plan = self._follow_plan(touched, rows.size)
        if plan is not None:
            ahead = plan.ahead()
            protected = np.concatenate([touched, *ahead])
            for window in ahead:
                self._request(window, protected=protected, needed=False)
        self._collect(touched)
        if self._unchecked[self._slot_of_chunk[touched]].any():
            self._check_unchanged()
        return self._slot_of_chunk[chunks] * self.chunk_rows + rows % self.chunk_rows

    def _follow_plan(self, touched: np.ndarray, rows: int) -> EpochPlan | None:
        """The epoch plan these rows read in order (the one read so far, or one that starts
        here), else ``None``: random-order reads decode only what they touch."""
        plan = self._plan
        if plan is None or not plan.follows(touched, rows, fresh=False):
            plan = next(
                (
                    candidate
                    for candidate in reversed(self._plans.values())
                    if candidate.follows(touched, rows, fresh=True)
                ),
                None,
            )
            self._plan = plan
        if plan is not None:
            plan.advance(touched)
        return plan

    def _request(self, chunks: np.ndarray, *, protected: np.ndarray, needed: bool) -> None:
        """Start decoding those of ``chunks`` not resident, into slots holding none of
        ``protected``; ``needed`` chunks always get a slot, others only a free one."""
        slots = self._slot_of_chunk[chunks]
        self._last_used[slots[slots >= 0]] = self._tick
        missing = chunks[slots < 0]
        if not missing.size:
            return
        victims = self._victims(missing.size, protected)
        if needed and victims.size < missing.size:
            self._collect(np.asarray(list(self.decoder.pending), dtype=np.int64), needed=False)
            victims = self._victims(missing.size, protected)
        for chunk, slot in zip(missing.tolist(), victims.tolist(), strict=False):
            evicted = self._chunk_of_slot[slot]
            if evicted >= 0:
                self._slot_of_chunk[evicted] = -1
            self._slot_of_chunk[chunk] = slot
            self._chunk_of_slot[slot] = chunk
            self._last_used[slot] = self._tick
            self._decoding[slot] = True
            self.decoder.submit(chunk, slot)

    def _victims(self, count: int, protected: np.ndarray) -> np.ndarray:
        """Up to ``count`` slots to decode into: least recently used first, none still decoding
        and none holding a ``protected`` chunk."""
        free = ~self._decoding & ~np.isin(self._chunk_of_slot, protected)
        candidates = np.flatnonzero(free)
        order = np.argsort(self._last_used[candidates], kind="stable")
        return candidates[order[:count]]

    def _decode_into_slot(self, chunk: int, slot: int) -> None:
        """On a decoding thread: chunk ``chunk``'s rows of every array into slot ``slot``."""
        assert self._tables is not None
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_samples)
        offset = slot * self.chunk_rows
        for name, table in self._tables.items():
            table[offset : offset + stop - start] = self.reader.read_rows(name, start, stop)

    def _collect_finished(self) -> None:
        """Take in the decodes that ended in the background (their slots become evictable)."""
        finished = self.decoder.finished() if self._decoder is not None else []
        if finished:
            self._collect(np.asarray(finished, dtype=np.int64), needed=False)

    def _collect(self, chunks: np.ndarray, *, needed: bool = True) -> None:
        """Wait for the decodes of ``chunks`` in flight and take them in, unchecked.

        A ``needed`` chunk that failed to decode raises its error; a chunk decoded ahead that
        failed is forgotten, to be decoded again (and raise) if a batch needs it.
        """
        pending = self._decoder.pending if self._decoder is not None else {}
        collected: list[int] = []
        failed: list[int] = []
        error: BaseException | None = None
        for chunk in chunks.tolist():
            if chunk not in pending:
                continue
            problem = self.decoder.collect(chunk)
            (failed if problem is not None else collected).append(chunk)
            if problem is not None and needed and error is None:
                error = problem
        self._forget(failed)
        slots = self._slot_of_chunk[collected]
        self._decoding[slots] = False
        self._unchecked[slots] = True
        self._chunks_decoded += len(collected)
        if error is not None:
            raise error

    def _check_unchanged(self) -> None:
        """Before serving rows of chunks decoded since the last check: the store is still the
        one opened. One check covers every chunk decoded before it, so a window of prefetched
        chunks costs one check (one request on a remote store), not one per chunk or batch."""
        try:
            self.reader.check_unchanged()
        except Exception:
            # never serve rows that may come from another store
            self._forget(self._chunk_of_slot[self._unchecked].tolist())
            raise
        self._unchecked[:] = False

    def _forget(self, chunks: list[int]) -> None:
        slots = self._slot_of_chunk[chunks]
        self._decoding[slots] = False
        self._unchecked[slots] = False
        self._chunk_of_slot[slots] = -1
        self._last_used[slots] = -1
        self._slot_of_chunk[chunks] = -1

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TeacherInput:
        if self._dense:
            rows = self._rows(indices)
            out = torch.empty((rows.size, self.num_classes), dtype=torch.float32)
            return self._gather_dense(rows, out)
        return super().read(indices)

    def read_dense(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        temperature: float | None = None,
    ) -> torch.Tensor:
        if self._dense:
            return self.read(indices)  # type: ignore[return-value]
        return super().read_dense(indices, temperature=temperature)

    def to_device(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, device: torch.device
    ) -> TeacherInput:
        if device.type != "cuda" or not self._dense:
            return super().to_device(indices, device)
        # Dense rows are gathered straight into the pinned buffer, without a copy on the host.
        rows = self._rows(indices)
        slot, host = self._pinned_buffer(torch.Size((rows.size, self.num_classes)))
        self._gather_dense(rows, host)
        return self._send(slot, host, device)

    def epoch_order(
        self, epoch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """Every sample index exactly once, in an order that differs per ``(seed, epoch)``.

        Chunked mode: chunks in random order, rows shuffled within windows of
        :attr:`window_chunks` chunks. In-memory mode: a plain random permutation. With
        ``world_size`` K > 1, rank ``rank``'s share: in chunked mode every K-th chunk of the
        epoch's chunk order (so each rank decodes only its own chunks), in memory the r-th of K
        slices; the K shares of an epoch hold every index once. A chunked feed remembers the
        order's windows, so that reading in this order decodes the next window ahead.
        """
        rng = np.random.default_rng([seed, epoch])
        return self._residency.epoch_order(
            self, rng, rank=rank, world_size=world_size, key=(seed, epoch, rank, world_size)
        )

    def _remember(self, key: tuple[int, int, int, int], windows: list[np.ndarray]) -> None:
        with self._lock:
            self._plans.pop(key, None)
            self._plans[key] = EpochPlan.of(
                windows, self.num_chunks, self.window_chunks * self.chunk_rows
            )
            while len(self._plans) > PLANS_KEPT:
                del self._plans[next(iter(self._plans))]


class _Residency(ABC):
    """Which decoded chunks the feed keeps: the strategy behind :attr:`LogitFeed.mode`."""

    name: ClassVar[str]

    @abstractmethod
    def capacity(self, feed: LogitFeed) -> int:
        """Chunk slots of the feed's table."""

    @abstractmethod
    def load(self, feed: LogitFeed, *, shared: bool) -> None:
        """Decode up front what the feed keeps for the whole run."""

    @abstractmethod
    def pieces(self, feed: LogitFeed, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """``rows`` in pieces: each piece's span in ``rows`` and its positions in the feed's
        tables, valid until the next piece is asked for."""

    @abstractmethod
    def epoch_order(
        self,
        feed: LogitFeed,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        """Rank ``rank``'s share of one epoch's order of every row, drawn from ``rng``."""


class _InMemory(_Residency):
    """Every chunk decoded once, up front; any order of indices is served at memory speed."""

    name = "memory"

    def capacity(self, feed: LogitFeed) -> int:
        return feed.num_chunks

    def load(self, feed: LogitFeed, *, shared: bool) -> None:
        if feed._tables is not None:
            return
        if shared:
            reader = feed.reader
            feed._shared = SharedTable.open(
                store_identity(reader.where, reader.metadata, reader.content_digest()),
                feed._layout,
                feed.num_samples,
                feed._check_and_decode_all,
            )
            feed._tables = feed._shared.arrays
        else:
            feed._allocate(feed.num_samples)
            assert feed._tables is not None
            feed._decode_all(feed._tables)
        feed._slot_of_chunk[:] = np.arange(feed.num_chunks)
        feed._chunk_of_slot[:] = np.arange(feed.num_chunks)

    def pieces(self, feed: LogitFeed, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        feed.load()
        yield slice(0, rows.size), rows

    def epoch_order(
        self,
        feed: LogitFeed,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        return np.array_split(rng.permutation(feed.num_samples), world_size)[rank]


class _Chunked(_Residency):
    """A bounded least-recently-used set of chunks, read best in :meth:`LogitFeed.epoch_order`."""

    name = "chunked"

    def capacity(self, feed: LogitFeed) -> int:
        capacity = min(feed.num_chunks, feed.memory_budget // feed.chunk_nbytes)
        if capacity < 2:
            raise ConfigError(
                f"cache memory {feed.memory_budget:,} bytes holds fewer than two of "
                f"{feed.reader.where}'s {feed.chunk_nbytes:,}-byte chunks; raise --cache-memory "
                f"to at least {2 * feed.chunk_nbytes:,} bytes"
            )
        return capacity

    def load(self, feed: LogitFeed, *, shared: bool) -> None:
        """Nothing up front: a chunk is decoded when a batch first needs it."""

    def pieces(self, feed: LogitFeed, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        if feed._tables is None:
            feed._allocate(feed.capacity * feed.chunk_rows)
        if np.unique(rows // feed.chunk_rows).size <= feed.capacity:
            yield slice(0, rows.size), feed._resident_positions(rows)
            return
        # Pieces of at most `capacity` rows touch at most `capacity` chunks, so they always fit.
        for start in range(0, rows.size, feed.capacity):
            piece = rows[start : start + feed.capacity]
            yield slice(start, start + piece.size), feed._resident_positions(piece)

    def epoch_order(
        self,
        feed: LogitFeed,
        rng: np.random.Generator,
        *,
        rank: int,
        world_size: int,
        key: tuple[int, int, int, int],
    ) -> np.ndarray:
        chunks = rng.permutation(feed.num_chunks)[rank::world_size]
        windows = [
            chunks[first : first + feed.window_chunks]
            for first in range(0, len(chunks), feed.window_chunks)
        ]
        parts = [np.empty(0, dtype=np.int64)]  # a rank may own no chunk when there are few
        for window in windows:
            rows = np.concatenate(
                [
                    np.arange(c * feed.chunk_rows, min((c + 1) * feed.chunk_rows, feed.num_samples))
                    for c in window
                ]
            )
            parts.append(rng.permutation(rows))
        feed._remember(key, windows)
        return np.concatenate(parts)


#: The feed's modes, by the name ``LogitFeed(mode=...)`` takes.
FEED_MODES: dict[str, _Residency] = {"memory": _InMemory(), "chunked": _Chunked()}


class _FeedSampler(Sampler[int]):
    """Yields :meth:`Feed.epoch_order` for epoch 0, 1, 2, ... on successive iterations.

    Give it to the DataLoader that loads the inputs so inputs arrive in the order in which the
    feed decodes chunks; pairing with logits is by the sample index each batch carries.
    """

    def __init__(self, feed: Feed, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.feed = feed
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _order(self) -> np.ndarray:
        return self.feed.epoch_order(
            self.epoch, seed=self.seed, rank=self.rank, world_size=self.world_size
        )

    def __len__(self) -> int:
        return self.feed.num_samples if self.world_size == 1 else len(self._order())

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        self.epoch += 1
        return iter(order.tolist())
