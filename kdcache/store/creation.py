"""What creating a store decides before any array exists: sizes, what is already there, whether
an interrupted dump may be resumed, and what a replacing dump may delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdcache.errors import ConfigError, StoreExistsError, StoreMismatchError
from kdcache.logits.encodings import Encoding, parse_encoding
from kdcache.store.digests import DIGESTS_ARRAY
from kdcache.store.layout import (
    LABELS_ARRAY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    own_keys,
    read_metadata,
)
from kdcache.store.location import StoreLocation, location_is_empty, zarr_store
from kdcache.store.metadata import ATTRIBUTE_KEY, StoreMetadata
from kdcache.store.schema import MAX_CLASSES, MAX_SAMPLES
from kdcache.store.swap import refuse_foreign_entries, remove_store_folder

#: Rows per chunk aim at about this many stored bytes: big enough that per-chunk overhead is
#: negligible, small enough that an interrupted dump loses little and chunks decode quickly.
TARGET_CHUNK_BYTES = 1 << 20
#: A chunk is decoded whole into memory: refuse chunk sizes no reader could hold comfortably.
MAX_CHUNK_BYTES = 1 << 30


def default_chunk_rows(
    encoding: Encoding, num_samples: int, num_classes: int, *, views: int = 1
) -> int:
    """Rows per chunk so that a chunk holds about :data:`TARGET_CHUNK_BYTES`; with views, a
    multiple of V, so that a chunk holds every view of its samples."""
    rows = max(1, min(num_samples * views, TARGET_CHUNK_BYTES // encoding.row_nbytes(num_classes)))
    return max(views, rows - rows % views)


def checked_sizes(
    codec: Encoding, num_samples: int, num_classes: int, chunk_rows: int | None, *, views: int = 1
) -> int:
    """Rows per chunk for a store of this size, refusing sizes no store could hold."""
    for name, value, high in (
        ("num_samples", num_samples, MAX_SAMPLES),
        ("num_classes", num_classes, MAX_CLASSES),
    ):
        if (
            not isinstance(value, (int, np.integer))
            or isinstance(value, bool)
            or not 1 <= value <= high
        ):
            raise ConfigError(f"{name} must be an integer from 1 to {high:,}, got {value!r}")
    row_nbytes = codec.row_nbytes(num_classes)  # also refuses topk:K with K >= C
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not 1 <= chunk_rows):
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    # More rows than samples is one chunk holding every sample: the same store.
    num_rows = num_samples * views
    rows = chunk_rows or default_chunk_rows(codec, num_samples, num_classes, views=views)
    rows = min(int(rows), num_rows)
    if rows * row_nbytes > MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunks of {rows:,} rows would hold {rows * row_nbytes:,} bytes each, more than the "
            f"{MAX_CHUNK_BYTES:,} a reader decodes at once; use chunk_rows <= "
            f"{max(1, MAX_CHUNK_BYTES // row_nbytes):,} (or leave it unset for about 1 MiB)"
        )
    return rows


def known_keys(group: zarr.Group, metadata: StoreMetadata) -> set[str]:
    names = [
        *parse_encoding(metadata.encoding, num_classes=metadata.num_classes).layout(
            metadata.num_classes
        )
    ]
    own = [*names, LABELS_ARRAY, VIEW_PARAMS_ARRAY, WRITTEN_ARRAY, DIGESTS_ARRAY]
    return set(own_keys(group, own))


def clear_staging(staging: StoreLocation, where: str) -> None:
    """Remove what an earlier, interrupted replacement left (only if it is a kdcache store)."""
    if location_is_empty(staging):
        return
    existing = existing_store(staging, zarr_store(staging, read_only=True))
    if existing is None:
        raise StoreExistsError(
            f"{staging.target} exists and is not a kdcache store, so --overwrite of {where} cannot "
            "build its replacement there; move it away and run again"
        )
    refuse_foreign_entries(Path(staging.target), known_keys(*existing), staging.text)
    remove_store_folder(Path(staging.target))


def existing_store(location: StoreLocation, store: Any) -> tuple[zarr.Group, StoreMetadata] | None:
    where = location.text
    if location_is_empty(location):
        return None
    try:
        group = zarr.open_group(store, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    if ATTRIBUTE_KEY not in group.attrs:
        raise StoreExistsError(
            f"{where} is a Zarr group but not a kdcache store; choose another path "
            "(kdcache never deletes it)"
        )
    return group, read_metadata(group, where)


def check_resumable(old: StoreMetadata, new: StoreMetadata, where: str) -> None:
    for field_name in (
        "num_samples",
        "num_classes",
        "encoding",
        "chunk_rows",
        "teacher",
        "dataset",
        "views",
        "augment",
    ):
        before, now = getattr(old, field_name), getattr(new, field_name)
        if before != now:
            raise StoreMismatchError(
                f"cannot resume {where}: its {_difference(field_name, before, now)}; "
                "resume with the original settings or pass --overwrite to start over"
            )


def _difference(name: str, before: Any, now: Any, *, depth: int = 0) -> str:
    """Only the part of two records that differs, e.g. ``dataset.fingerprint.labels_sha256``."""
    if isinstance(before, dict) and isinstance(now, dict) and depth < 3:
        for key in sorted(before.keys() | now.keys()):
            if before.get(key) != now.get(key):
                return _difference(f"{name}.{key}", before.get(key), now.get(key), depth=depth + 1)
    return f"{name} is {_shorten(before)} but this dump has {_shorten(now)}"


def _shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
