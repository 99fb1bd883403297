"""Join stores that each hold some samples of one dataset into one store of the whole dataset.

Each source records which samples of the dataset it holds in its ``dataset_indices`` array
(``kdcache convert --indices`` writes it, and so can
``create_store(..., arrays={"dataset_indices": ...})`` for a dump of a part). The sources must
share the teacher, encoding, class count, views and the whole dataset's record; together they
must hold every sample exactly once. Rows are copied in their stored encoding, chunk by chunk
(never decoded: a ``sampled:S`` row keeps its draws, a ``topk:K`` row its tail statistics),
through :meth:`~kdcache.store.write.writer.StoreWriter.write_encoded`, so the new store gets
every writer guarantee and is verified before it is marked complete. Image stores (with or
without views) and token (sequence) stores alike.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from kdcache._version import __version__
from kdcache.errors import ConfigError, StoreExistsError, StoreMismatchError
from kdcache.store.format.layout import (
    DATASET_INDICES_ARRAY,
    FIRST_TOKEN_ARRAY,
    OFFSETS_ARRAY,
    SEQUENCE_KEY,
    StoreLike,
)
from kdcache.store.format.location import StoreLocation, parse_location, zarr_store
from kdcache.store.read.joined import (
    JOINED_FORMAT,
    JOINED_KEY,
    PART_FIELDS,
    part_identity,
    refuse_different_parts,
    sample_owners,
    whole_dataset,
    whole_size,
)
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import SequenceReader, rows_of, sequence_offsets
from kdcache.store.tools.convert import CONVERTED_FROM_KEY, recorded_dataset_indices
from kdcache.store.tools.verified_write import write_verified_store
from kdcache.store.write.swap import remove_store_folder, staging_location, swap_in
from kdcache.temporaries import create_folder

if TYPE_CHECKING:
    from kdcache.store.write.writer import StoreWriter

__all__ = [
    "CONCATENATED_FROM_KEY",
    "ConcatResult",
    "concat_stores",
    "link_stores",
]

#: Where the joined store's metadata records its sources (``extra``).
CONCATENATED_FROM_KEY = "concatenated_from"


@dataclass(frozen=True)
class ConcatResult:
    """The joined store: where, its samples (sequences in a token store), views and encoding."""

    out: str
    num_samples: int
    views: int
    encoding: str
    num_sources: int
    nbytes: int | None


@dataclass
class _Source:
    text: str
    reader: StoreReader
    sequences: SequenceReader | None
    indices: np.ndarray


def concat_stores(
    sources: Sequence[StoreLike],
    out: StoreLike,
    *,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ConcatResult:
    """Write the stores ``sources``, each holding some samples of one dataset, into ``out``.

    Sample i of ``out`` is sample i of the whole dataset: each source's samples go where its
    ``dataset_indices`` say. Refused in one line, nothing written: fewer than two sources, a
    source that records no ``dataset_indices``, sources of different teachers, encodings, class
    counts, views or datasets, a sample held by two sources (overlap) or by none (gap), and an
    ``out`` that is a source, lies inside one or holds one.
    """
    out_location = parse_location(out)
    opened, dataset, total = _checked_parts(sources, out_location)
    first = opened[0]
    metadata = first.reader.metadata
    views = metadata.views
    arrays: dict[str, np.ndarray] | None = None
    extra = _common_extra(opened)
    extra[CONCATENATED_FROM_KEY] = [_provenance(source) for source in opened]
    if first.sequences is None:
        new_starts = np.arange(total + 1, dtype=np.int64) * views
        num_rows = total
    else:
        lengths = np.zeros(total, dtype=np.int64)
        first_token = np.zeros(total, dtype=np.int64)
        # Rows at the counted positions only do not tell a sample's length: the sources'
        # records do.
        max_length = 0
        for source in opened:
            assert source.sequences is not None
            lengths[source.indices] = source.sequences.lengths
            first_token[source.indices] = source.sequences.first_token
            max_length = max(max_length, int(source.sequences.layout["max_length"]))
        new_starts = sequence_offsets(lengths)
        num_rows = int(new_starts[-1])
        arrays = {OFFSETS_ARRAY: new_starts, FIRST_TOKEN_ARRAY: first_token}
        every_position = first.sequences.every_position
        extra[SEQUENCE_KEY] = {
            "num_sequences": total,
            "num_tokens": num_rows,
            "max_length": max_length,
            **({} if every_position else {"every_position": False}),
        }
    labels = _joined_labels(opened, new_starts, num_rows)
    params = _joined_view_params(opened, total)

    def fill(writer: StoreWriter) -> None:
        for source in opened:
            _copy_source(source, new_starts, writer.write_encoded)

    write_verified_store(
        out,
        fill,
        num_samples=num_rows,
        num_classes=metadata.num_classes,
        encoding=metadata.encoding,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=metadata.teacher,
        dataset=dataset,
        extra=extra,
        overwrite=overwrite,
        views=views,
        augment=metadata.augment,
        view_params=params,
        fsync=fsync,
        arrays=arrays,
    )
    return ConcatResult(
        out=out_location.text,
        num_samples=total,
        views=views,
        encoding=metadata.encoding,
        num_sources=len(opened),
        nbytes=out_location.nbytes(),
    )


def link_stores(
    sources: Sequence[StoreLike], out: StoreLike, *, overwrite: bool = False
) -> ConcatResult:
    """Write ``out``, a joined store that reads the stores ``sources`` in place as one store of
    the whole dataset (no row is copied; :class:`~kdcache.store.read.reader.JoinedReader`).

    ``out`` records each source's path (relative to ``out`` when both are on local disk, so
    that a folder holding them all can move) or URL, ``generation``, content and record
    digests and which samples it holds; :func:`~kdcache.store.read.reader.open_store` refuses
    it once a source is missing or changed. Refused as :func:`concat_stores` refuses, and for
    token (sequence) stores (copy those with :func:`concat_stores`) and a zip ``out``. An
    existing ``out`` is replaced only with ``overwrite``: a local one once the new record opens
    (built beside it, then swapped in), a remote one in place.
    """
    out_location = parse_location(out)
    if out_location.kind == "zip":
        raise ConfigError(
            f"a joined store is a folder or URL, not a zip: {out_location.text}; choose a folder "
            "such as joined.zarr"
        )
    opened, _dataset, total = _checked_parts(sources, out_location)
    first = opened[0]
    if first.sequences is not None:
        raise ConfigError(
            f"{first.text} is a token (sequence) store; --link joins image stores only: copy "
            "token parts into one store with `kdcache concat` without --link"
        )
    if not out_location.is_empty() and not overwrite:
        raise StoreExistsError(
            f"{out_location.text} already exists; pass --overwrite to replace it, or choose "
            "another --out"
        )
    record = {
        "format": JOINED_FORMAT,
        "generation": uuid.uuid4().hex,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "kdcache_version": __version__,
        "parts": [
            {
                **{key: value for key, value in _provenance(source).items() if key in PART_FIELDS},
                "store": _part_path(source, out_location),
            }
            for source in opened
        ],
    }
    _publish_joined(out_location, {JOINED_KEY: record})
    return ConcatResult(
        out=out_location.text,
        num_samples=total,
        views=first.reader.metadata.views,
        encoding=first.reader.metadata.encoding,
        num_sources=len(opened),
        nbytes=out_location.nbytes(),
    )


def _part_path(source: _Source, out: StoreLocation) -> str:
    """Where a joined store at ``out`` finds the part ``source``: relative to ``out`` when both
    are on local disk, else its resolved path or URL."""
    part, folder = parse_location(source.text).resolved(), out.resolved().folder
    if folder is None or part.kind == "remote":
        return part.target
    return os.path.relpath(part.target, folder)


def _publish_joined(out: StoreLocation, attributes: dict[str, Any]) -> None:
    """Write a joined store's group at ``out``, checked to open before it replaces anything."""
    folder = out.resolved().folder
    if folder is None:  # an object store: one zarr.json, put whole
        zarr.open_group(zarr_store(out, read_only=False), mode="w", attributes=attributes)
        open_store(out)
        return
    staging = staging_location(out.resolved())
    assert staging.folder is not None
    create_folder(staging.folder, purpose="the joined store being written")
    try:
        zarr.open_group(zarr_store(staging, read_only=False), mode="w", attributes=attributes)
        open_store(staging)
        if os.path.lexists(folder):
            swap_in(staging.folder, folder, out.text)
        else:
            os.rename(staging.folder, folder)
    except BaseException:
        if staging.folder.exists():
            remove_store_folder(staging.folder)
        raise


def _open_source(source: StoreLike, out: str, given: str) -> _Source:
    location = parse_location(source)
    text = location.text
    resolved = location.resolved().target
    if resolved == out:
        raise ConfigError(
            f"the output {given!r} is the source store {text} itself; choose a new path "
            "(concat never rewrites its sources)"
        )
    for inner, outer, what in ((out, resolved, "inside"), (resolved, out, "around")):
        if inner.startswith(outer.rstrip("/") + "/"):
            raise ConfigError(
                f"the output {given!r} lies {what} the source store {text}; choose a path "
                "outside every source"
            )
    reader = open_store(source)  # refuses missing, foreign, damaged or unfinished stores
    indices = recorded_dataset_indices(reader)
    if indices is None:
        raise StoreMismatchError(
            f"{text} records no {DATASET_INDICES_ARRAY!r} (which samples of the dataset it holds); "
            "concat joins parts written by `kdcache convert --indices` or by create_store(..., "
            f"arrays={{{DATASET_INDICES_ARRAY!r}: indices}})"
        )
    sequences = (
        SequenceReader(reader)
        if isinstance(reader.metadata.extra.get(SEQUENCE_KEY), dict)
        else None
    )
    count = reader.num_samples if sequences is None else sequences.num_sequences
    if indices.shape != (count,) or (indices.size and indices.min() < 0):
        raise StoreMismatchError(
            f"{text}: its {DATASET_INDICES_ARRAY!r} hold {indices.size} indices (smallest "
            f"{indices.min() if indices.size else None}) for {count} samples; each sample needs "
            "one index >= 0"
        )
    if np.unique(indices).size != indices.size:
        values, counts = np.unique(indices, return_counts=True)
        raise StoreMismatchError(
            f"{text}: its {DATASET_INDICES_ARRAY!r} list sample {values[counts > 1][0]} more "
            "than once; each sample of the dataset belongs in one place: convert the part again"
        )
    return _Source(text=text, reader=reader, sequences=sequences, indices=indices)


def _checked_parts(
    sources: Sequence[StoreLike], out: StoreLocation
) -> tuple[list[_Source], dict[str, Any] | None, int]:
    """The parts opened, the whole dataset's record and its sample count, once the parts are
    refused unless they make that dataset, each sample once."""
    if len(sources) < 2:
        raise ConfigError(
            f"concat joins at least two stores, got {len(sources)}; name every part of the dataset"
        )
    target = out.resolved().target
    opened = [_open_source(source, target, out.text) for source in sources]
    first = opened[0]
    for other in opened[1:]:
        refuse_different_parts(_identity(first), _identity(other), first.text, other.text, "concat")
    dataset = whole_dataset(first.reader.metadata.dataset)
    size = whole_size(dataset, tokens=first.sequences is not None)
    owners = sample_owners([source.indices for source in opened], [s.text for s in opened], size)
    return opened, dataset, owners.size


def _identity(source: _Source) -> dict[str, Any]:
    return {
        **part_identity(source.reader.metadata, source.reader.encoding.name),
        "kind": "token (sequence) store" if source.sequences is not None else "image store",
        "rows at every position": source.sequences is None or source.sequences.every_position,
    }


def _common_extra(opened: list[_Source]) -> dict[str, Any]:
    """The ``extra`` notes every source shares (less where each came from and its layout)."""
    first = opened[0].reader.metadata.extra
    skip = {CONVERTED_FROM_KEY, CONCATENATED_FROM_KEY, SEQUENCE_KEY}
    return {
        key: value
        for key, value in first.items()
        if key not in skip
        and all(source.reader.metadata.extra.get(key) == value for source in opened[1:])
    }


def _provenance(source: _Source) -> dict[str, Any]:
    metadata = source.reader.metadata
    return {
        "store": parse_location(source.text).resolved().target,
        "generation": metadata.generation,
        "content_sha256": source.reader.content_digest(),
        "record_digest": (metadata.digests or {}).get("record"),
        "num_samples": int(source.indices.size),
        "dataset_indices_sha256": hashlib.sha256(
            source.indices.astype("<i8").tobytes()
        ).hexdigest(),
        "fidelity": metadata.fidelity,
    }


def _source_rows(source: _Source, new_starts: np.ndarray) -> np.ndarray:
    """Where each of ``source``'s rows goes in the joined store, in its row order."""
    if source.sequences is None:
        views = source.reader.metadata.views
        rows = np.arange(source.reader.num_rows, dtype=np.int64)
        return new_starts[source.indices[rows // views]] + rows % views
    return rows_of(new_starts, source.indices)


def _joined_labels(
    opened: list[_Source], new_starts: np.ndarray, num_rows: int
) -> np.ndarray | None:
    """Every source's labels in their new places; ``None`` when any source has none."""
    parts = [source.reader.labels for source in opened]
    if any(part is None for part in parts):
        return None
    labels = np.zeros(num_rows if opened[0].sequences is not None else new_starts.size - 1, "<i8")
    for source, part in zip(opened, parts, strict=True):
        assert part is not None
        if source.sequences is None:
            labels[source.indices] = part
        else:
            labels[_source_rows(source, new_starts)] = part
    return labels


def _joined_view_params(opened: list[_Source], total: int) -> np.ndarray | None:
    parts = [source.reader.view_params for source in opened]
    if parts[0] is None:
        return None
    params = np.zeros((total, *parts[0].shape[1:]), dtype=np.float32)
    for source, part in zip(opened, parts, strict=True):
        assert part is not None
        params[source.indices] = part
    return params


def _copy_source(source: _Source, new_starts: np.ndarray, write: Any) -> None:
    """Copy ``source``'s encoded rows one chunk at a time to their places in the new store."""
    reader = source.reader
    metadata = reader.metadata
    destinations = _source_rows(source, new_starts)
    names = list(reader.encoding.layout(metadata.num_classes))
    for start in range(0, metadata.num_rows, metadata.chunk_rows):
        stop = min(start + metadata.chunk_rows, metadata.num_rows)
        write(
            destinations[start:stop], {name: reader.read_rows(name, start, stop) for name in names}
        )
