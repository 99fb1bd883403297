"""The logit feed of one store: teacher logits for any batch of sample indices, gathered from a
table of decoded chunks in RAM.

Zarr cannot serve random rows fast (each row costs a whole chunk's decompression, see
docs/benchmarks.md), so the feed keeps decoded chunks in a table of fixed-size slots in RAM and
gathers a batch with one ``np.take`` per array (no per-sample Python). Which chunks the table
holds is the feed's mode (:data:`FEED_MODES`): the whole store when it fits ``memory_budget``
(kdcache.store.read.in_memory), else a bounded set that follows the epoch order
(kdcache.store.read.chunked). Chunks of a local store are decoded from their files straight into
their slot (kdcache.store.read.chunk_files), others through zarr; the reader's guard checks
each one before it is served.

A dense float16 store's rows reach float32 through torch in blocks of fewer than 32,768
elements: numpy's float16 conversion is several times slower, and torch's thread pool (which it
enters above that size) costs more than it saves while a training step holds the cores.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdcache.errors import ConfigError
from kdcache.logits.encodings import DenseEncoding
from kdcache.store.read.chunked import Chunked
from kdcache.store.read.decoding import LOCAL_DECODE_THREADS, ChunkDecoder
from kdcache.store.read.feed import Feed, RowSource, default_memory_budget, parse_size
from kdcache.store.read.in_memory import InMemory
from kdcache.store.read.residency import Residency

if TYPE_CHECKING:
    from kdcache.logits.sparse import TeacherInput
    from kdcache.store.read.shared_table import SharedTable

__all__ = [
    "FEED_MODES",
    "LogitFeed",
]

#: The feed's modes, by the name ``LogitFeed(mode=...)`` takes.
FEED_MODES: dict[str, type[Residency]] = {"memory": InMemory, "chunked": Chunked}
#: Elements converted to float32 per torch call: below torch's grain size (32,768), so torch
#: converts in the calling thread instead of waking its thread pool.
_CONVERT_BLOCK_ELEMENTS = 32_000


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
        self._mode = residency
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
        self._reset()
        self._chunks_decoded = 0

    def _reset(self) -> None:
        #: Which chunks the table holds, and their books.
        self.residency = self._mode(self)
        self._decoder: ChunkDecoder | None = None
        self._lock = threading.Lock()
        self._scratch: tuple[np.ndarray, torch.Tensor] | None = None

    @property
    def mode(self) -> str:
        """``"memory"`` (the whole store decoded once) or ``"chunked"`` (a bounded set of
        chunks)."""
        return self.residency.name

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
            for key, value in self.__dict__.items()
            if key not in ("residency", "_decoder", "_lock", "_scratch")
        }
        state.update(_tables=None, _shared=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

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
        self.residency.load(shared=shared)

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
            for span, positions in self.residency.pieces(rows):
                assert self._tables is not None
                for name, table in self._tables.items():
                    # mode="clip" skips numpy's buffered bounds check: _rows checked them
                    np.take(table, positions, axis=0, out=gathered[name][span], mode="clip")
        return gathered

    def _gather_dense(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Dense float rows ``rows`` as float32 into ``out`` ((B, C), contiguous, on the CPU)."""
        target = out.numpy()
        with self._lock:
            for span, positions in self.residency.pieces(rows):
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

    def _decode_into_slot(self, chunk: int, slot: int) -> None:
        """On a decoding thread: chunk ``chunk``'s rows of every array into slot ``slot``."""
        assert self._tables is not None
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_samples)
        offset = slot * self.chunk_rows
        for name, table in self._tables.items():
            self.reader.read_rows_into(name, start, stop, table[offset : offset + stop - start])

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
        return self.residency.epoch_order(
            rng, rank=rank, world_size=world_size, key=(seed, epoch, rank, world_size)
        )
