"""What readers and writers share: array names, opening the group, its metadata, chunk presence.

Layout (see docs/store-format.md): one array per name in the encoding's layout, each of shape
``(N * V, ...)`` (V views per sample, 1 by default) chunked by ``chunk_rows`` rows and
compressed with zstd plus a crc32c checksum;
``labels`` ``(N,)`` when labels are known; ``chunk_written`` ``(num_chunks,)``, one flag per row
chunk set only after that chunk's data is durably stored; and the :class:`StoreMetadata` record
in the group attributes, whose ``complete`` flag is written last; ``view_params`` ``(N, V, P)``
in stores with augmented views.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from kdcache.errors import StoreFormatError, StoreNotFoundError
from kdcache.store._zarr_compat import row_chunk_exists
from kdcache.store.location import (
    StoreLocation,
    location_exists,
    location_nbytes,
    parse_location,
    zarr_store,
)
from kdcache.store.metadata import ATTRIBUTE_KEY, StoreMetadata

#: Anything that names a store: a path, an fsspec URL, a .zip file (see kdcache.store.location).
StoreLike = str | os.PathLike[str] | StoreLocation

WRITTEN_ARRAY = "chunk_written"
LABELS_ARRAY = "labels"
#: (N, V, P) float32: the parameters that recreate each view's input (stores with views only).
VIEW_PARAMS_ARRAY = "view_params"


def store_nbytes(path: StoreLike) -> int | None:
    """Bytes a local store (or packed zip) occupies on disk; ``None`` for a remote store."""
    return location_nbytes(parse_location(path))


def row_ranges(rows: np.ndarray) -> str:
    """Compact text for a sorted set of row indices, e.g. ``0-99, 200-255``."""
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate(([rows[0]], rows[breaks + 1]))
    stops = np.concatenate((rows[breaks], [rows[-1]]))
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, stops, strict=False)]
    return ", ".join(parts[:5]) + (f" and {len(parts) - 5} more ranges" if len(parts) > 5 else "")


def missing_chunks(array: Any, chunks: np.ndarray) -> np.ndarray:
    """Those row ``chunks`` of ``array`` whose stored object is absent.

    Zarr reads an absent chunk as fill values, so decoding alone cannot tell: a written chunk
    that is missing was deleted or lost in a copy.
    """
    if array.nchunks_initialized >= len(chunks):
        return np.empty(0, dtype=np.int64)
    return np.array([c for c in chunks if not row_chunk_exists(array, int(c))], dtype=np.int64)


def read_metadata(group: zarr.Group, where: str) -> StoreMetadata:
    attributes = group.attrs.asdict()
    if ATTRIBUTE_KEY not in attributes:
        raise StoreFormatError(
            f"{where} is a Zarr group but not a kdcache store (no {ATTRIBUTE_KEY!r} attributes); "
            "pass a store written by `kdcache dump-teacher` or kdcache.create_store"
        )
    return StoreMetadata.from_dict(attributes[ATTRIBUTE_KEY], where=where)


def open_group(location: StoreLocation) -> zarr.Group:
    """The store's Zarr group, opened read-only."""
    where = location.text
    if not location_exists(location):
        raise StoreNotFoundError(
            f"no store at {where}; check the path or run `kdcache dump-teacher`"
        )
    try:
        return zarr.open_group(zarr_store(location, read_only=True), mode="r")
    except (
        FileNotFoundError,
        zarr.errors.GroupNotFoundError,
        zarr.errors.NodeTypeValidationError,
    ) as error:
        raise StoreFormatError(
            f"{where} is not a kdcache store (no Zarr v3 group there: {error}); "
            "pass a store written by `kdcache dump-teacher`"
        ) from None
