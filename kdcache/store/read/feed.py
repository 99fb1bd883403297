"""The logit feed's interface: teacher logits for any batch of sample indices, and the order
to read them in.

:class:`Feed` is what the training loop, the samplers and the readers use.
:class:`~kdcache.store.read.logit_feed.LogitFeed` serves one store from a table of decoded chunks
in RAM, in one of two modes (kdcache.store.read.in_memory, kdcache.store.read.chunked);
:class:`~kdcache.store.read.joined.JoinedFeed` serves the parts of a joined store. DataLoader
workers never need the feed (the training loop gathers in the main process), but a reader handed
to workers stays correct: a forked child reopens the Zarr group (see
:meth:`kdcache.store.read.reader.StoreReader.array`) and pickling drops the table.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from kdcache.errors import ConfigError

if TYPE_CHECKING:
    from kdcache.logits.encodings import Encoding
    from kdcache.logits.sparse import TeacherInput
    from kdcache.store.format.metadata import StoreMetadata

__all__ = [
    "Feed",
    "RowSource",
    "default_memory_budget",
    "parse_size",
]


class RowSource(Protocol):
    """What the feed needs of a store: its metadata and contiguous row reads (a StoreReader)."""

    metadata: StoreMetadata
    encoding: Encoding
    where: str

    def read_rows_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None: ...

    def check_chunks_present(self, name: str) -> None: ...

    def check_unchanged(self) -> None: ...

    def content_digest(self) -> str: ...


#: Share of the memory available when the feed is built that it may use by default.
_DEFAULT_MEMORY_FRACTION = 0.5

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
    index (:meth:`gather`, :meth:`read`, :meth:`read_dense`) and the order to read them in
    (:meth:`epoch_order`, :meth:`sampler`). :class:`~kdcache.store.read.logit_feed.LogitFeed`
    serves one store; :class:`~kdcache.store.read.joined.JoinedFeed` the parts of a joined
    store."""

    #: The store read: its metadata, encoding and name (``where``) for errors.
    reader: RowSource
    #: Rows the feed serves: samples, or every view of every sample (``sample * V + view``).
    num_samples: int
    #: Bytes of decoded chunks the feed may keep in RAM.
    memory_budget: int

    def __init__(self, reader: RowSource) -> None:
        self.reader = reader

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

    def sampler(self, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> _FeedSampler:
        """A DataLoader sampler that follows :meth:`epoch_order`, one epoch per iteration."""
        return _FeedSampler(self, seed=seed, rank=rank, world_size=world_size)


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
