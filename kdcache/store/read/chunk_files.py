"""Row chunks of a local store read as files and decoded into the caller's buffer, past zarr.

Through ``array[start:stop]`` zarr reads each chunk on its event-loop thread, decompresses it into
a new buffer and copies that into a new array. Fresh megabyte buffers cost more than the copy:
the kernel maps and zeroes their pages on every chunk, which made up half of a chunk's decode
(docs/benchmarks.md, "The feed at the memory limit"). :class:`ChunkFileReader` reads the chunk's
file in the calling thread, checks its crc32c and decompresses it with numcodecs straight into
the caller's buffer (a slot of the feed's table, whose pages stay mapped), all of which release
the GIL. It follows the array's own codec chain as its ``zarr.json`` names it, and only the chains
kdcache writes (``bytes`` in this machine's byte order, or ``kdcache.packed_ints``, then ``zstd``
and ``crc32c``, each optional); other stores, codecs and byte orders keep zarr's path. A packed
chunk (the ids and offsets of sparse stores) has no fixed size: it is decompressed and unpacked
in the calling thread, then copied into the buffer, which spares zarr's event loop and its
copies. A chunk this path cannot read (a missing file, a crc32c mismatch, a zstd frame or packed
chunk that does not hold exactly one chunk) is left to zarr's path as well, whose errors name
what is wrong. The checks of the decoded values
(kdcache.store.read.guard) are the same on both paths.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from kdcache.store.format._zarr_compat import row_chunk_key
from kdcache.store.format.packed_ints import PackedIntsCodec, unpack_rows

__all__ = [
    "ChunkFileReader",
]

#: The codec chains after ``bytes`` that this path decodes (as zarr.json lists them).
_CHAINS: list[list[type]] = [[], [ZstdCodec], [Crc32cCodec], [ZstdCodec, Crc32cCodec]]
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame's header records (RFC 8878, 3.1.1.1), ``None`` if it
    records none or is not a zstd frame."""
    if len(frame) < 6 or frame[:4] != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    size_flag, single_segment, dictionary_flag = (
        descriptor >> 6,
        descriptor >> 5 & 1,
        descriptor & 3,
    )
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(frame) < position + width:
        return None
    size = int.from_bytes(frame[position : position + width], "little")
    return size + 256 if width == 2 else size


class ChunkFileReader:
    """Decodes row chunks of one array of a local store into the caller's buffer (see module)."""

    def __init__(
        self, array: Any, root: Path, *, zstd_frames: bool, crc32c: bool, packed: bool = False
    ) -> None:
        self._array = array
        self._root = root
        self._zstd = zstd_frames
        self._crc32c = crc32c
        self._packed = packed
        self._chunk_shape = tuple(array.chunks)
        self._dtype = np.dtype(array.dtype)
        self._chunk_nbytes = int(np.prod(self._chunk_shape)) * self._dtype.itemsize

    @classmethod
    def for_array(cls, array: Any) -> ChunkFileReader | None:
        """A reader of ``array``'s chunks when it lies in a local store and uses a codec chain
        known here; ``None`` otherwise (zarr's own path is then used)."""
        store = array.store_path.store
        codecs = list(array.metadata.codecs)
        if not isinstance(store, LocalStore) or not codecs:
            return None
        serializer, rest = codecs[0], [type(codec) for codec in codecs[1:]]
        packed = isinstance(serializer, PackedIntsCodec)
        if not (packed or isinstance(serializer, BytesCodec)) or rest not in _CHAINS:
            return None
        if not packed:
            stored = serializer.endian.name if serializer.endian is not None else sys.byteorder
            if np.dtype(array.dtype).itemsize > 1 and stored != sys.byteorder:
                return None
        return cls(
            array,
            Path(store.root),
            zstd_frames=ZstdCodec in rest,
            crc32c=Crc32cCodec in rest,
            packed=packed,
        )

    def decode_into(self, chunk: int, out: np.ndarray) -> bool:
        """Row chunk ``chunk`` decoded into ``out`` (its rows, C-contiguous, of the array's
        dtype); ``False``, with ``out`` in any state, when this path cannot read the chunk."""
        try:
            with open(self._root / row_chunk_key(self._array, chunk), "rb") as file:
                # the checksum's 4 bytes read apart: google_crc32c takes bytes, not a slice
                size = os.fstat(file.fileno()).st_size - (4 if self._crc32c else 0)
                if size < 0:  # shorter than its checksum: zarr's path names the damage
                    return False
                data, checksum = file.read(size), file.read()
        except OSError:
            return False
        if len(data) != size or (
            self._crc32c and int.from_bytes(checksum, "little") != google_crc32c.value(data)
        ):
            return False
        if self._packed:
            return self._unpack_into(data, out)
        # zarr stores the last, partial chunk at the full chunk shape
        whole = out.shape[0] == self._chunk_shape[0]
        target = out if whole else np.empty(self._chunk_shape, dtype=self._dtype)
        if self._zstd:
            # numcodecs fills a larger buffer without saying how much it wrote
            if _zstd_content_size(data) != self._chunk_nbytes:
                return False
            try:
                zstd.decompress(data, target)
            except (RuntimeError, ValueError):
                return False
        elif len(data) == self._chunk_nbytes:
            target.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            return False
        if not whole:
            out[...] = target[: out.shape[0]]
        return True

    def _unpack_into(self, data: bytes, out: np.ndarray) -> bool:
        """A ``kdcache.packed_ints`` chunk (zstd frame or not) into ``out``; ``False`` for one
        that does not unpack to exactly one chunk of the array's dtype."""
        if self._zstd:
            # A packed chunk is never much larger than its values: each takes at most about
            # twice its bits, so a frame declaring more (or no size) is left to zarr's path.
            size = _zstd_content_size(data)
            if size is None or size > 3 * self._chunk_nbytes + 64 + 5 * self._chunk_shape[0]:
                return False
        try:
            values = unpack_rows(zstd.decompress(data) if self._zstd else data)
        except (RuntimeError, ValueError):
            return False
        if values.dtype != self._dtype or values.size != int(np.prod(self._chunk_shape)):
            return False
        out[...] = values.reshape(self._chunk_shape)[: out.shape[0]]
        return True
