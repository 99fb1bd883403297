"""Create and fill kdcache logit stores, Zarr v3 groups keyed by sample index.

The layout is described in :mod:`kdcache.store.layout`; reading is :mod:`kdcache.store.reader`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache._version import __version__
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    KdcacheError,
    StoreExistsError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreWriteError,
)
from kdcache.logits.encodings import Encoding, parse_encoding
from kdcache.logits.fidelity import SAMPLE_EVERY as FIDELITY_SAMPLE_EVERY
from kdcache.logits.fidelity import FidelityAccumulator
from kdcache.store.durability import ChunkSync
from kdcache.store.layout import (
    LABELS_ARRAY,
    WRITTEN_ARRAY,
    StoreLike,
    read_metadata,
    row_ranges,
)
from kdcache.store.location import (
    StoreLocation,
    location_is_empty,
    parse_location,
    remove_partial_files,
    zarr_store,
)
from kdcache.store.locking import WriterLock, acquire_writer_lock
from kdcache.store.metadata import ATTRIBUTE_KEY, StoreMetadata

#: Rows per chunk aim at about this many stored bytes: big enough that per-chunk overhead is
#: negligible, small enough that an interrupted dump loses little and chunks decode quickly.
TARGET_CHUNK_BYTES = 1 << 20


def _compressors() -> list[Any]:
    # zstd level 1: logits barely compress beyond their dtype, so spend little CPU on it.
    return [ZstdCodec(level=1), Crc32cCodec()]


def default_chunk_rows(encoding: Encoding, num_samples: int, num_classes: int) -> int:
    """Rows per chunk so that a chunk holds about :data:`TARGET_CHUNK_BYTES`."""
    return max(1, min(num_samples, TARGET_CHUNK_BYTES // encoding.row_nbytes(num_classes)))


class StoreWriter:
    """Accepts logits for any rows in any order and stores every chunk as soon as it is full.

    Whole contiguous chunks are the fast path: they go to disk without waiting for other rows.
    Call :meth:`finalize` once every row is written; the store is complete only after it.
    """

    def __init__(
        self,
        group: zarr.Group,
        metadata: StoreMetadata,
        where: str,
        lock: WriterLock | None = None,
        *,
        sync: ChunkSync | None = None,
    ) -> None:
        self._group = group
        self._where = where
        self._lock = lock
        self._sync = sync
        self.metadata = metadata
        self.encoding = parse_encoding(metadata.encoding, num_classes=metadata.num_classes)
        self._layout = self.encoding.layout(metadata.num_classes)
        # Store every chunk, even one equal to the fill value, so a missing chunk file is damage.
        self._arrays = {
            name: group[name].with_config({"write_empty_chunks": True}) for name in self._layout
        }
        self._written_array = group[WRITTEN_ARRAY]
        self._written = np.asarray(self._written_array[:], dtype=bool)
        self._buffers: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
        #: Fidelity of the encoding over the rows this writer has stored (see kdcache.logits.fidelity).
        self.fidelity = FidelityAccumulator(self.encoding, sample_every=FIDELITY_SAMPLE_EVERY)

    @property
    def num_chunks(self) -> int:
        return len(self._written)

    def pending_indices(self) -> np.ndarray:
        """Row indices whose chunk is not yet durably written (all rows of a fresh store)."""
        return self.metadata.rows_of_chunks(np.flatnonzero(~self._written))

    def write(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor
    ) -> None:
        """Store raw logits ``(B, C)`` for the sample indices ``(B,)``."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().to("cpu", torch.float32).numpy()
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        block = np.asarray(logits, dtype=np.float32)
        self._check_block(rows, block)
        encoded = self.encoding.encode(block)
        chunk_of_row = rows // self.metadata.chunk_rows
        self.fidelity.update(block, encoded, indices=rows, keep=~self._written[chunk_of_row])
        for chunk in np.unique(chunk_of_row):
            chunk = int(chunk)
            if self._written[chunk]:
                continue  # already durable (a resumed dump may recompute a partial batch)
            start, stop = self.metadata.chunk_bounds(chunk)
            buffers, filled = self._buffers.get(chunk) or self._new_buffer(stop - start)
            selected = chunk_of_row == chunk
            local = rows[selected] - start
            for name, values in encoded.items():
                buffers[name][local] = values[selected]
            filled[local] = True
            if filled.all():
                self._buffers.pop(chunk, None)
                self._flush(chunk, buffers)
            else:
                self._buffers[chunk] = (buffers, filled)

    def _new_buffer(self, num_rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        buffers = {
            name: np.empty((num_rows, *shape), dtype=dtype)
            for name, (shape, dtype) in self._layout.items()
        }
        return buffers, np.zeros(num_rows, dtype=bool)

    def _check_block(self, rows: np.ndarray, block: np.ndarray) -> None:
        num_classes = self.metadata.num_classes
        if block.ndim != 2 or block.shape[1] != num_classes or block.shape[0] != rows.size:
            raise InvalidLogitsError(
                f"expected logits of shape ({rows.size}, {num_classes}) for samples "
                f"{row_ranges(np.unique(rows))}, got {tuple(block.shape)}; the teacher's output "
                f"width must equal the store's {num_classes} classes"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= self.metadata.num_samples):
            raise InvalidLogitsError(
                f"sample indices must lie in [0, {self.metadata.num_samples}), "
                f"got values from {rows.min()} to {rows.max()}"
            )
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise InvalidLogitsError(
                f"teacher logits are NaN or Inf for samples {row_ranges(np.sort(rows[bad]))}; "
                "check the teacher's weights and inputs"
            )

    def _flush(self, chunk: int, buffers: dict[str, np.ndarray]) -> None:
        start, stop = self.metadata.chunk_bounds(chunk)
        for name, values in buffers.items():
            self._arrays[name][start:stop] = values
        if self._sync is not None:  # the data must be on disk before the flag can be
            self._sync.chunk(self._arrays.values(), chunk)
        # The flag goes last: a crash between the two leaves the chunk marked unwritten.
        self._written_array[chunk] = 1
        self._written[chunk] = True
        if self._sync is not None:
            self._sync.chunk([self._written_array], chunk)
        if self._lock is not None:
            self._lock.refresh()

    def keep_lock(self) -> None:
        """Renew the writer lock (a remote lease) while the writer waits between writes."""
        if self._lock is not None:
            self._lock.refresh()

    def finalize(self) -> StoreMetadata:
        """Mark the store complete; refuses while any row is missing."""
        # The flags in the store are the truth: other ranks of a torchrun job wrote chunks too.
        self._written = np.asarray(self._written_array[:], dtype=bool)
        missing = self.pending_indices()
        if missing.size:
            raise StoreIncompleteError(
                f"cannot finalize {self._where}: no logits were written for samples "
                f"{row_ranges(missing)}; write every row before finalize()"
            )
        fidelity = self.fidelity.result()
        self.metadata = self.metadata.replace(
            complete=True, fidelity=None if fidelity is None else fidelity.to_dict()
        )
        self._group.attrs[ATTRIBUTE_KEY] = self.metadata.to_dict()
        if self._sync is not None:
            self._sync.metadata()
        self.close()
        return self.metadata

    def close(self) -> None:
        """Release the writer lock; an unfinished store stays resumable (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_store(
    path: StoreLike,
    *,
    num_samples: int,
    num_classes: int,
    encoding: str = "float16",
    labels: np.ndarray | Sequence[int] | None = None,
    chunk_rows: int | None = None,
    teacher: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    fsync: bool = True,
) -> StoreWriter:
    """Create an empty store at ``path`` (or reopen an interrupted one) and return its writer.

    ``resume=True`` continues an incomplete store made with the same parameters; ``overwrite=True``
    replaces an existing kdcache store. Anything else already at ``path`` is never touched. The
    writer holds the store's single-writer lock (kdcache.store.locking) until ``finalize`` or ``close``.
    ``fsync=False`` skips making each chunk durable before its flag (kdcache.store.durability).
    """
    location = parse_location(path)
    where = location.text
    if num_samples < 1 or num_classes < 1:
        raise ConfigError(
            f"num_samples and num_classes must be >= 1, got {num_samples} and {num_classes}"
        )
    codec = parse_encoding(encoding)
    rows = chunk_rows or default_chunk_rows(codec, num_samples, num_classes)
    if rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {rows}")
    label_values = None
    if labels is not None:
        label_values = np.asarray(labels, dtype=np.int64).reshape(-1)
        if label_values.size != num_samples:
            raise ConfigError(f"expected {num_samples} labels, got {label_values.size}")

    metadata = StoreMetadata(
        num_samples=num_samples,
        num_classes=num_classes,
        encoding=encoding,
        chunk_rows=rows,
        teacher=teacher,
        dataset=dataset,
        kdcache_version=__version__,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    store = zarr_store(location, read_only=False)
    lock = acquire_writer_lock(location)
    try:
        writer = _create_locked(
            location, store, lock, metadata, codec, label_values, resume=resume, overwrite=overwrite
        )
        writer._sync = ChunkSync.for_location(location, enabled=fsync)
        return writer
    except BaseException as error:
        lock.release()
        if isinstance(error, OSError) and not isinstance(error, KdcacheError):
            raise StoreWriteError(
                f"cannot write the store at {where}: {error.strerror or error}; choose a writable "
                "path with free space"
            ) from None
        raise


def _create_locked(
    location: StoreLocation,
    store: Any,
    lock: WriterLock,
    metadata: StoreMetadata,
    codec: Encoding,
    label_values: np.ndarray | None,
    *,
    resume: bool,
    overwrite: bool,
) -> StoreWriter:
    where = location.text
    existing = _existing_store(location, store)
    if existing is not None:
        group, old = existing
        if resume and not old.complete and not overwrite:
            _check_resumable(old, metadata, where)
            remove_partial_files(location)  # temporary files of a killed writer; we hold the lock
            if WRITTEN_ARRAY in group:
                return StoreWriter(group, old, where, lock)
            # Killed while creating the arrays: nothing was computed yet, so start afresh below.
        elif not overwrite:
            if old.complete:
                raise StoreExistsError(
                    f"{where} already holds a complete store; pass --overwrite (overwrite=True) "
                    "to replace it, or choose another path"
                )
            raise StoreExistsError(
                f"{where} holds an interrupted dump; pass --resume (resume=True) to continue it "
                "or --overwrite (overwrite=True) to start over"
            )
    elif not location_is_empty(location):
        raise StoreExistsError(
            f"{where} exists and is not a kdcache store; choose another path (kdcache never deletes it)"
        )

    num_samples, num_classes, rows = metadata.num_samples, metadata.num_classes, metadata.chunk_rows
    # The kdcache record goes into the group's first zarr.json write: a kill right after creation
    # must leave a store that --resume recognises as its own.
    group = zarr.open_group(
        store, mode="w", zarr_format=3, attributes={ATTRIBUTE_KEY: metadata.to_dict()}
    )
    for name, (shape, dtype) in codec.layout(num_classes).items():
        group.create_array(
            name,
            shape=(num_samples, *shape),
            chunks=(rows, *shape),
            dtype=dtype,
            fill_value=0,
            compressors=_compressors(),
        )
    if label_values is not None:
        labels_array = group.create_array(
            LABELS_ARRAY,
            shape=(num_samples,),
            chunks=(max(rows, 1 << 16),),
            dtype="int64",
            fill_value=-1,
            compressors=_compressors(),
        )
        labels_array[:] = label_values
    # Created last: its presence means every other array and the labels are in place.
    group.create_array(
        WRITTEN_ARRAY, shape=(metadata.num_chunks,), chunks=(1,), dtype="uint8", fill_value=0
    )
    return StoreWriter(group, metadata, where, lock)


def _existing_store(location: StoreLocation, store: Any) -> tuple[zarr.Group, StoreMetadata] | None:
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


def _check_resumable(old: StoreMetadata, new: StoreMetadata, where: str) -> None:
    for field_name in (
        "num_samples",
        "num_classes",
        "encoding",
        "chunk_rows",
        "teacher",
        "dataset",
    ):
        before, now = getattr(old, field_name), getattr(new, field_name)
        if before != now:
            raise StoreMismatchError(
                f"cannot resume {where}: its {field_name} is {before!r} but this dump has {now!r}; "
                "resume with the original settings or pass --overwrite to start over"
            )
