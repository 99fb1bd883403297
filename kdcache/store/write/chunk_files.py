"""Row chunks of a local store encoded in the writing thread and written as files, past zarr.

Through ``array[start:stop] = values`` every chunk is handed to zarr's one event-loop thread,
which encodes it (zstd in a further thread), writes it and hands the result back: several
thread hops per chunk, part of them holding the GIL, and every writer thread of a dump queues on
that one loop (docs/benchmarks.md, "Writer threads"). :class:`ChunkFiles` instead runs each
array's own codec chain (``bytes`` or ``kdcache.packed_ints``, then ``zstd`` and ``crc32c``, as
its ``zarr.json`` names them) in the calling thread, with numcodecs, hashlib and crc32c releasing
the GIL, and writes the bytes under the same keys the way zarr's ``LocalStore`` does (a
temporary ``*.partial`` name, then a rename), so the files are byte for byte what zarr writes and
plain zarr reads them. With ``sync`` each file is flushed once renamed, and every folder
that gained an entry is flushed after it (kdcache.store.write.durability): a chunk's files are on
disk before the caller writes its flag.

Only arrays of a local store whose codecs are all known here get a :class:`ChunkFiles`
(:meth:`ChunkFiles.for_arrays`); others (object stores, foreign codecs) keep zarr's path.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

import kdcache.store.write.durability as durability
from kdcache.store.format._zarr_compat import row_chunk_key
from kdcache.store.format.packed_ints import PackedIntsCodec, pack_rows

__all__ = [
    "ChunkFiles",
]

_Step = Callable[[bytes], bytes]


def _serializer(codec: Any, dtype: np.dtype) -> Callable[[np.ndarray], bytes] | None:
    if isinstance(codec, PackedIntsCodec):
        return pack_rows
    if isinstance(codec, BytesCodec):
        # zarr writes the chunk in C order in the codec's byte order (native when it has none).
        big = codec.endian is not None and codec.endian.name == "big"
        stored = dtype.newbyteorder(">" if big else "<") if dtype.itemsize > 1 else dtype
        return lambda values: np.ascontiguousarray(values, dtype=stored).tobytes()
    return None


def _append_crc32c(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).tobytes()


def _bytes_step(codec: Any) -> _Step | None:
    if isinstance(codec, ZstdCodec):
        compress = Zstd(level=codec.level, checksum=codec.checksum).encode
        return lambda data: bytes(compress(data))
    if isinstance(codec, Crc32cCodec):
        return _append_crc32c
    return None


class _ChunkCodec:
    """One array's codec chain as plain functions, and the fill value a last chunk is padded
    with (zarr stores a boundary chunk at the full chunk shape)."""

    def __init__(self, serialize: Callable[[np.ndarray], bytes], steps: list[_Step], array: Any):
        self._serialize = serialize
        self._steps = steps
        self._chunk_shape = tuple(array.chunks)
        self._dtype = np.dtype(array.dtype)
        self._fill = array.metadata.fill_value

    def encode(self, values: np.ndarray) -> bytes:
        values = np.asarray(values, dtype=self._dtype).reshape(-1, *self._chunk_shape[1:])
        if values.shape[0] < self._chunk_shape[0]:
            padded = np.full(self._chunk_shape, self._fill, dtype=self._dtype)
            padded[: values.shape[0]] = values
            values = padded
        data = self._serialize(values)
        for step in self._steps:
            data = step(data)
        return data


def _chunk_codec(array: Any) -> _ChunkCodec | None:
    """``array``'s codecs as a :class:`_ChunkCodec`, or ``None`` when one is unknown here."""
    codecs = list(array.metadata.codecs)
    if not codecs:
        return None
    serialize = _serializer(codecs[0], np.dtype(array.dtype))
    steps = [_bytes_step(codec) for codec in codecs[1:]]
    if serialize is None or any(step is None for step in steps):
        return None
    return _ChunkCodec(serialize, [step for step in steps if step is not None], array)


class ChunkFiles:
    """Encodes row chunks of a local store's arrays and writes them as files (see module)."""

    def __init__(self, root: Path, codecs: dict[str, tuple[Any, _ChunkCodec]]) -> None:
        self.root = root
        self._codecs = codecs
        #: Folders this writer has flushed once: only an entry added since needs a flush again
        #: (the first flush also covers entries a killed writer added and never flushed).
        self._flushed: set[Path] = set()
        self._flushed_lock = threading.Lock()

    @classmethod
    def for_arrays(cls, arrays: dict[str, zarr.Array]) -> ChunkFiles | None:
        """A writer for ``arrays`` (name: array) when they all lie in one local store and use
        codecs known here; ``None`` otherwise (zarr's own path is then used)."""
        stores = {id(array.store_path.store): array.store_path.store for array in arrays.values()}
        if len(stores) != 1:
            return None
        (store,) = stores.values()
        if not isinstance(store, LocalStore):
            return None
        codecs = {}
        for name, array in arrays.items():
            codec = _chunk_codec(array)
            if codec is None:
                return None
            codecs[name] = (array, codec)
        return cls(Path(store.root), codecs)

    def encode(self, name: str, chunk: int, values: np.ndarray) -> tuple[str, bytes]:
        """The store key and the encoded bytes of row chunk ``chunk`` of array ``name``."""
        array, codec = self._codecs[name]
        return row_chunk_key(array, chunk), codec.encode(values)

    def put(self, objects: Iterable[tuple[str, bytes]], *, sync: bool) -> None:
        """Write each ``(key, bytes)`` as zarr's LocalStore would; with ``sync`` every file and
        every folder that gained an entry is on disk when this returns."""
        changed: set[Path] = set()
        for key, data in objects:
            path = self.root / key
            changed.update(self._make_folders(path.parent))
            partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
            try:
                with open(partial, "wb") as file:
                    file.write(data)
                partial.replace(path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            if sync:
                durability.fsync_path(path)
            changed.add(path.parent)
        if sync:
            self._flush_folders(changed)

    def _make_folders(self, folder: Path) -> list[Path]:
        """Create ``folder`` and its missing parents; the folders that gained an entry."""
        if folder.is_dir():
            return []
        gained = [*self._make_folders(folder.parent), folder.parent]
        with contextlib.suppress(FileExistsError):  # another thread made it first
            folder.mkdir()
        return gained

    def _flush_folders(self, changed: set[Path]) -> None:
        with self._flushed_lock:
            first = {
                parent
                for folder in changed
                for parent in (folder, *folder.parents)
                if parent.is_relative_to(self.root) and parent not in self._flushed
            }
        # Deepest first: each folder holds the entry of the one below.
        for folder in sorted(changed | first, key=lambda p: len(p.parts), reverse=True):
            durability.fsync_path(folder)
        with self._flushed_lock:
            # A folder that gained an entry is flushed whenever it does: remembering only the
            # others keeps this set small (one row chunk's folders are written once).
            self._flushed.update(first - changed)
