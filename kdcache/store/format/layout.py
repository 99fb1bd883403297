"""What readers and writers share: array names, opening the group, its metadata, chunk presence.

Layout (see docs/store-format.md): one array per name in the encoding's layout, each of shape
``(N * V, ...)`` (V views per sample, 1 by default) chunked by ``chunk_rows`` rows and
compressed with zstd plus a crc32c checksum;
``labels`` ``(N,)`` when labels are known; ``chunk_written`` ``(num_chunks,)``, one flag per row
chunk set only after that chunk's data is durably stored; and the :class:`StoreMetadata` record
in the group attributes, whose ``complete`` flag is written last; ``view_params`` ``(N, V, P)``
in stores with augmented views; ``offsets`` ``(S + 1,)`` and ``first_token`` ``(S,)`` in sequence
stores (kdcache.store.sequence). Every array is under a digest (kdcache.store.format.digests).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from kdcache.errors import StoreFormatError, StoreNotFoundError
from kdcache.store.format._zarr_compat import has_key, row_chunk_exists
from kdcache.store.format.location import (
    ZIP_ERRORS,
    StoreLocation,
    parse_location,
    zarr_store,
)
from kdcache.store.format.metadata import ATTRIBUTE_KEY, StoreMetadata

__all__ = [
    "DATASET_INDICES_ARRAY",
    "FIRST_TOKEN_ARRAY",
    "LABELS_ARRAY",
    "OFFSETS_ARRAY",
    "SEQUENCE_KEY",
    "VIEW_PARAMS_ARRAY",
    "WRITTEN_ARRAY",
    "ZARR_METADATA_ERRORS",
    "StoreLike",
    "first_line",
    "has_array",
    "missing_chunks",
    "open_array",
    "open_group",
    "own_keys",
    "read_metadata",
    "row_ranges",
    "sequence_count",
    "store_nbytes",
]

#: Anything that names a store: a path, an fsspec URL, a .zip file (see
# kdcache.store.format.location).
StoreLike = str | os.PathLike[str] | StoreLocation

WRITTEN_ARRAY = "chunk_written"
LABELS_ARRAY = "labels"
#: (N, V, P) float32: the parameters that recreate each view's input (stores with views only).
VIEW_PARAMS_ARRAY = "view_params"
#: A sequence store's (N + 1,) token-row offsets and (N,) first token ids (kdcache.store.sequence).
OFFSETS_ARRAY = "offsets"
FIRST_TOKEN_ARRAY = "first_token"
#: (n,) int64: the dataset's sample (sequence) index of each sample of a store that holds only
#: some of them (``kdcache convert --indices``), so stores of disjoint parts can be joined
#: (kdcache.store.tools.concat).
DATASET_INDICES_ARRAY = "dataset_indices"
#: Key of a sequence store's layout (num_sequences, num_tokens, max_length) in ``extra``.
SEQUENCE_KEY = "sequence"


def sequence_count(metadata: StoreMetadata) -> int | None:
    """N, the sequences of a sequence store as its record says (``None`` for other stores, or
    a record that does not say it as an integer)."""
    layout = metadata.extra.get(SEQUENCE_KEY)
    count = layout.get("num_sequences") if isinstance(layout, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def store_nbytes(path: StoreLike) -> int | None:
    """Bytes a local store (or packed zip) occupies on disk; ``None`` for a remote store."""
    return parse_location(path).nbytes()


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
    """The store's metadata record, checked against the schema (kdcache.store.format.schema)."""
    attributes = group.attrs.asdict()
    if ATTRIBUTE_KEY not in attributes:
        raise StoreFormatError(
            f"{where} is a Zarr group but not a kdcache store (no {ATTRIBUTE_KEY!r} attributes); "
            "pass a store written by `kdcache dump-teacher` or kdcache.create_store"
        )
    record: Any = attributes[ATTRIBUTE_KEY]  # any JSON: the schema check comes first
    return StoreMetadata.from_dict(record, where=where)


def open_group(location: StoreLocation) -> zarr.Group:
    """The store's Zarr group, opened read-only."""
    where = location.text
    if not location.exists():
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
    except ZARR_METADATA_ERRORS as error:
        raise StoreFormatError(
            f"{where} has an unreadable zarr.json ({first_line(error)}); restore it from a good "
            "copy or dump the store again"
        ) from None


#: What zarr raises for a zarr.json that is not valid JSON or not valid Zarr metadata (an
#: unknown data_type or codec, a wrong type): each becomes one StoreFormatError line.
ZARR_METADATA_ERRORS = (
    ValueError,
    OverflowError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    ArithmeticError,  # a fill value that overflows the dtype
    *ZIP_ERRORS,
)


def first_line(error: BaseException) -> str:
    """An exception's message cut to one short line, for one-line errors."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (text or type(error).__name__)[:160]


def has_array(group: zarr.Group, name: str) -> bool:
    """Whether the store holds an array ``name``, decided without parsing its (maybe damaged)
    metadata; :func:`open_array` then reports damage in one line."""
    return has_key(group, f"{name}/zarr.json")


def open_array(group: zarr.Group, name: str, where: str) -> Any:
    """The array ``name`` of the store, or StoreFormatError if it is missing or unreadable."""
    try:
        return group[name]
    except KeyError:
        raise StoreFormatError(
            f"{where} lacks its array {name!r} (deleted or lost in a copy); restore it from a good "
            "copy or dump the store again"
        ) from None
    except ZARR_METADATA_ERRORS as error:
        raise StoreFormatError(
            f"{where}: the zarr.json of array {name!r} is unreadable ({first_line(error)}); "
            "restore it from a good copy or dump the store again"
        ) from None


def own_keys(group: zarr.Group, names: list[str]) -> list[str]:
    """Every key the store itself may hold: the group's and each named array's ``zarr.json`` and
    all of each array's chunk keys (whether written or not)."""
    keys = ["zarr.json"]
    for name in names:
        if not has_array(group, name):
            continue
        array = open_array(group, name, "the store")
        keys.append(f"{name}/zarr.json")
        keys += [
            f"{name}/{array.metadata.encode_chunk_key(coords)}"
            for coords in np.ndindex(*array.cdata_shape)
        ]
    return keys
