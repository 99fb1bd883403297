"""Creating a store: its sizes, what is already at the path, whether an interrupted dump may be
resumed, what a replacing dump may delete, and the arrays of a fresh store."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from kdcache.errors import ConfigError, KdcacheError, StoreExistsError, StoreMismatchError
from kdcache.logits.encodings import Encoding, parse_encoding
from kdcache.store.format.digests import (
    ALGORITHM,
    DIGEST_BYTES,
    DIGESTS_ARRAY,
    record_digest,
    values_digest,
)
from kdcache.store.format.layout import (
    DATASET_INDICES_ARRAY,
    FIRST_TOKEN_ARRAY,
    LABELS_ARRAY,
    OFFSETS_ARRAY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    has_array,
    open_array,
    own_keys,
    read_metadata,
    row_ranges,
)
from kdcache.store.format.location import StoreLocation, zarr_store
from kdcache.store.format.metadata import ATTRIBUTE_KEY, StoreMetadata
from kdcache.store.format.packed_ints import PackedIntsCodec
from kdcache.store.format.pinning import array_spec
from kdcache.store.format.schema import MAX_CLASSES, MAX_SAMPLES
from kdcache.store.write.swap import refuse_foreign_entries, remove_store_folder
from kdcache.temporaries import own_folder_exists

__all__ = [
    "check_resumable",
    "check_same_arrays",
    "checked_further_arrays",
    "checked_labels",
    "checked_sizes",
    "checked_view_params",
    "clear_staging",
    "create_arrays",
    "existing_store",
    "known_keys",
    "staged_store",
    "staging_purpose",
]

#: Rows per chunk aim at about this many stored bytes: big enough that per-chunk overhead is
#: negligible, small enough that an interrupted dump loses little and chunks decode quickly.
_TARGET_CHUNK_BYTES = 1 << 20
#: A chunk is decoded whole into memory: refuse chunk sizes no reader could hold comfortably.
_MAX_CHUNK_BYTES = 1 << 30


def _default_chunk_rows(
    encoding: Encoding, num_samples: int, num_classes: int, *, views: int = 1
) -> int:
    """Rows per chunk so that a chunk holds about :data:`_TARGET_CHUNK_BYTES`; with views, a
    multiple of V, so that a chunk holds every view of its samples."""
    rows = max(1, min(num_samples * views, _TARGET_CHUNK_BYTES // encoding.row_nbytes(num_classes)))
    return max(views, rows - rows % views)


def _compressors() -> list[Any]:
    # zstd level 1: logits barely compress beyond their dtype, so spend little CPU on it.
    return [ZstdCodec(level=1), Crc32cCodec()]


def _view_params_codecs() -> dict[str, Any]:
    """Codecs of ``view_params`` (N, V, P) float32: field-major order, then byte shuffle + zstd.

    The parameters are mostly small integers (pixel boxes, flags, partner indices) held as
    float32, whose low bytes are zero and whose fields differ in range. Plain zstd sees them
    interleaved; one field after another (``transpose`` to (P, N, V)) with each byte plane
    together (Blosc ``shuffle``) takes an ``rrc+flip`` view at 224 x 224 from 6.6 to 4.8 bytes
    and an ``rrc+flip+mixup`` view from 21.4 to 15.3 (docs/results.md). Blosc level 3: higher
    levels save under 1 B per view at a twentieth of the speed. Both are Zarr v3 spec codecs; stores
    made with the older ``zstd`` codecs read the same (zarr follows each array's zarr.json).
    """
    return {
        "filters": [TransposeCodec(order=(2, 0, 1))],
        "compressors": [
            BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=4),
            Crc32cCodec(),
        ],
    }


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
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not chunk_rows >= 1):
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    # More rows than samples is one chunk holding every sample: the same store.
    num_rows = num_samples * views
    rows = chunk_rows or _default_chunk_rows(codec, num_samples, num_classes, views=views)
    rows = min(int(rows), num_rows)
    if rows * row_nbytes > _MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunks of {rows:,} rows would hold {rows * row_nbytes:,} bytes each, more than the "
            f"{_MAX_CHUNK_BYTES:,} a reader decodes at once; use chunk_rows <= "
            f"{max(1, _MAX_CHUNK_BYTES // row_nbytes):,} (or leave it unset for about 1 MiB)"
        )
    return rows


def known_keys(group: zarr.Group, metadata: StoreMetadata) -> set[str]:
    names = [
        *parse_encoding(metadata.encoding, num_classes=metadata.num_classes).layout(
            metadata.num_classes
        )
    ]
    own = [*names, LABELS_ARRAY, VIEW_PARAMS_ARRAY, WRITTEN_ARRAY, DIGESTS_ARRAY]
    # Arrays given at creation (a part's dataset_indices, any later one) are its own too: the
    # record pins and digests each of them.
    recorded = {*(metadata.arrays or {}), *((metadata.digests or {}).get("whole") or {})}
    # A sequence store's layout arrays are its own too (own_keys skips those a store lacks).
    names = [*own, OFFSETS_ARRAY, FIRST_TOKEN_ARRAY, DATASET_INDICES_ARRAY]
    return set(own_keys(group, [*names, *sorted(recorded - set(names))]))


def staging_purpose(where: str) -> str:
    """What ``STORE.incoming`` is for, as errors about it name it."""
    return f"the replacement being built for {where}"


def staged_store(staging: StoreLocation) -> tuple[zarr.Group, StoreMetadata] | None:
    """The kdcache store in the folder ``staging`` (a real folder of this user: see
    :func:`kdcache.temporaries.own_folder_exists`), or ``None`` when it holds none."""
    try:
        return existing_store(staging, zarr_store(staging, read_only=False))
    except (KdcacheError, OSError, ValueError):
        return None


def clear_staging(staging: StoreLocation, where: str) -> None:
    """Remove what an earlier, interrupted replacement left at ``staging``: an unfinished
    kdcache store holding only its own files. Anything else there is refused, never deleted: a
    link, a file, another user's folder, a folder that is no kdcache store, a complete store.
    The caller holds the writer lock of the store at ``where``."""
    root = Path(staging.target)
    if not own_folder_exists(root, purpose=staging_purpose(where)):
        return
    if not any(root.iterdir()):
        root.rmdir()
        return
    existing = staged_store(staging)
    if existing is None:
        raise StoreExistsError(
            f"{root} exists and is not a kdcache store, so --overwrite of {where} cannot "
            "build its replacement there; move it away and run again"
        )
    if existing[1].complete:
        raise StoreExistsError(
            f"{root} holds a complete kdcache store (another store, or the old one left by an "
            f"interrupted --overwrite of {where}), which kdcache never deletes; check it, then "
            "move it away or remove it and run again"
        )
    refuse_foreign_entries(root, known_keys(*existing), staging.text)
    remove_store_folder(root)


def existing_store(location: StoreLocation, store: Any) -> tuple[zarr.Group, StoreMetadata] | None:
    where = location.text
    if location.is_empty():
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
        if field_name == "teacher" and isinstance(before, dict) and isinstance(now, dict):
            # A store dumped before batch sizes were recorded resumes with any batch size.
            now = {key: value for key, value in now.items() if key in before or key != "batch_size"}
        if field_name == "augment" and _only_sampler_differs(before, now):
            drawn_by = before.get("sampler")
            raise StoreMismatchError(
                f"cannot resume {where}: its views were drawn by "
                + (f"the generator {drawn_by!r}" if drawn_by else "an older kdcache's generator")
                + f" but this dump draws with {now.get('sampler')!r}, so its missing views would "
                "not match the stored ones; pass --overwrite to dump it again (or finish it with "
                "the kdcache release that started it)"
            )
        if before != now:
            raise StoreMismatchError(
                f"cannot resume {where}: its {_difference(field_name, before, now)}; "
                "resume with the original settings or pass --overwrite to start over"
            )


def _only_sampler_differs(before: Any, now: Any) -> bool:
    """Two ``augment`` records that differ only in the generator that drew the views."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return False
    if before.get("sampler") == now.get("sampler"):
        return False
    return {k: v for k, v in before.items() if k != "sampler"} == {
        k: v for k, v in now.items() if k != "sampler"
    }


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


def create_arrays(
    store: Any,
    metadata: StoreMetadata,
    codec: Encoding,
    label_values: np.ndarray | None,
    view_params: np.ndarray | None = None,
    further: dict[str, np.ndarray] | None = None,
) -> tuple[zarr.Group, StoreMetadata]:
    """Create every array of a fresh store in ``store`` (emptied first); returns its group and
    its metadata with the digests and the pinned array metadata filled in. Per-row arrays
    hold ``num_samples * views`` rows; ``view_params`` ``(N, V, P)`` is stored when given, and
    each of ``further`` (name: int64 values, e.g. a sequence store's ``offsets``) as one array.
    Every array written here is digested whole (kdcache.store.format.digests)."""
    num_samples, num_classes, rows = metadata.num_samples, metadata.num_classes, metadata.chunk_rows
    layout = codec.layout(num_classes)
    metadata = metadata.replace(digests={"algorithm": ALGORITHM, "arrays": list(layout)})
    # The kdcache record goes into the group's first zarr.json write: a kill right after creation
    # must leave a store that --resume recognises as its own.
    group = zarr.open_group(
        store, mode="w", zarr_format=3, attributes={ATTRIBUTE_KEY: metadata.to_dict()}
    )
    arrays = {}
    for name, (shape, dtype) in layout.items():
        arrays[name] = group.create_array(
            name,
            shape=(metadata.num_rows, *shape),
            chunks=(rows, *shape),
            dtype=dtype,
            fill_value=0,
            serializer=PackedIntsCodec() if name in codec.packed_arrays else "auto",
            compressors=_compressors(),
        )
    whole: dict[str, np.ndarray] = {}
    if label_values is not None:
        arrays[LABELS_ARRAY] = group.create_array(
            LABELS_ARRAY,
            shape=(num_samples,),
            chunks=(max(rows, 1 << 16),),
            dtype="int64",
            fill_value=-1,
            compressors=_compressors(),
        )
        whole[LABELS_ARRAY] = label_values
    if view_params is not None:
        _, views, width = view_params.shape
        arrays[VIEW_PARAMS_ARRAY] = group.create_array(
            VIEW_PARAMS_ARRAY,
            shape=view_params.shape,
            chunks=(max(1, _TARGET_CHUNK_BYTES // (4 * views * width)), views, width),
            dtype="float32",
            fill_value=0,
            **_view_params_codecs(),
        )
        whole[VIEW_PARAMS_ARRAY] = view_params
    for name, values in (further or {}).items():
        # Small next to the rows: one chunk, written before any row can be flagged.
        arrays[name] = group.create_array(
            name,
            shape=values.shape,
            chunks=(max(1, values.size),),
            dtype="int64",
            fill_value=0,
            compressors=_compressors(),
        )
        whole[name] = values
    for name, values in whole.items():
        # Every chunk written, all-zero ones too (a part holding only sample 0): verify asks
        # for each.
        arrays[name].with_config({"write_empty_chunks": True})[:] = values
    arrays[DIGESTS_ARRAY] = group.create_array(
        DIGESTS_ARRAY,
        shape=(metadata.num_chunks, len(layout), DIGEST_BYTES),
        chunks=(1, len(layout), DIGEST_BYTES),
        dtype="uint8",
        fill_value=0,
        compressors=[Crc32cCodec()],
    )
    digests = {
        **(metadata.digests or {}),
        "whole": {
            name: values_digest(name, np.asarray(values, dtype=arrays[name].dtype))
            for name, values in whole.items()
        },
    }
    metadata = metadata.replace(
        arrays={name: array_spec(a) for name, a in arrays.items()}, digests=digests
    )
    # The record digest covers the record as it reads back from JSON (tuples become lists).
    bound = json.loads(json.dumps(metadata.to_dict()))
    metadata = metadata.replace(digests={**digests, "record": record_digest(bound)})
    group.attrs[ATTRIBUTE_KEY] = metadata.to_dict()
    # Created last: its presence means every other array, the labels and the record are in place.
    group.create_array(
        WRITTEN_ARRAY,
        shape=(metadata.num_chunks,),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=[Crc32cCodec()],
    )
    return group, metadata


def checked_labels(
    labels: np.ndarray | Sequence[int] | None, num_samples: int, num_classes: int
) -> np.ndarray | None:
    """``labels`` as int64 ``(num_samples,)``, refusing what a reader would refuse: anything but
    integer class indices in ``[0, num_classes)``."""
    if labels is None:
        return None
    values = np.asarray(labels).reshape(-1)
    if values.size != num_samples:
        raise ConfigError(f"expected {num_samples} labels, got {values.size}")
    if values.dtype.kind not in "iu":
        raise ConfigError(
            f"labels must be integer class indices, got {values.dtype} values such as "
            f"{values[:3].tolist()}; pass an integer array"
        )
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        raise ConfigError(
            f"labels must lie in [0, {num_classes}) (the store's classes), got {values[bad[0]]} "
            f"for samples {row_ranges(bad)}; pass labels=None for unlabeled data, or fix them"
        )
    return values.astype(np.int64)


def checked_further_arrays(
    arrays: dict[str, np.ndarray] | None, *, reserved: Iterable[str]
) -> dict[str, np.ndarray] | None:
    """``arrays`` (written once beside the rows) as int64, refusing a name the store already
    uses and values that are not integers (a float would be truncated)."""
    if not arrays:
        return arrays
    taken = {*reserved, LABELS_ARRAY, VIEW_PARAMS_ARRAY, WRITTEN_ARRAY, DIGESTS_ARRAY}
    checked = {}
    for name, values in arrays.items():
        if name in taken:
            raise ConfigError(
                f"array name {name!r} is taken by the store itself ({', '.join(sorted(taken))}); "
                "choose another name"
            )
        values = np.asarray(values)
        if values.dtype.kind not in "iu":
            raise ConfigError(
                f"array {name!r} must hold integers, got {values.dtype}; pass an integer array"
            )
        checked[name] = values.astype(np.int64)
    return checked


def check_same_arrays(
    group: zarr.Group, old: StoreMetadata, given: dict[str, np.ndarray | None], where: str
) -> None:
    """Refuse to resume a store whose arrays written once (labels, view_params, offsets, ...)
    differ from this dump's: its missing rows would be computed for other inputs. Compared by
    digest where the store records one, else by reading the stored values."""
    recorded = (old.digests or {}).get("whole")
    for name, values in given.items():
        if values is None:
            continue
        if not has_array(group, name):
            same = False
        elif recorded is not None and name in recorded:
            array = open_array(group, name, where)
            same = values_digest(name, np.asarray(values, dtype=array.dtype)) == recorded[name]
        else:
            stored = np.asarray(open_array(group, name, where)[:])
            same = stored.shape == values.shape and np.array_equal(stored, values)
        if not same:
            raise StoreMismatchError(
                f"cannot resume {where}: its {name} differ from this dump's (another dataset, "
                "seed or recipe, or the store was edited); resume with the original settings or "
                "pass --overwrite to start over"
            )


def checked_view_params(
    view_params: np.ndarray | None, num_samples: int, views: int, augment: dict[str, Any] | None
) -> np.ndarray | None:
    """``view_params`` as float32 ``(num_samples, views, P)``, checked against ``augment``."""
    if view_params is None:
        return None
    params = np.asarray(view_params, dtype=np.float32)
    if params.ndim != 3 or params.shape[:2] != (num_samples, views):
        raise ConfigError(
            f"view_params must have shape ({num_samples}, {views}, P) for {num_samples} samples "
            f"with {views} views, got {params.shape}"
        )
    fields = (augment or {}).get("fields")
    if fields is not None and len(fields) != params.shape[2]:
        raise ConfigError(
            f"augment names {len(fields)} parameter fields but view_params holds "
            f"{params.shape[2]} per view; they must agree"
        )
    if not np.isfinite(params).all():
        raise ConfigError("view_params hold NaN or Inf; every view's parameters must be finite")
    return params
