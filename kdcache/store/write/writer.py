"""Create and fill kdcache logit stores, Zarr v3 groups keyed by sample index (and view).

The layout is described in :mod:`kdcache.store.format.layout`; reading is
:mod:`kdcache.store.read.reader`.
"""

from __future__ import annotations

import datetime as _dt
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from kdcache._version import __version__
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    KdcacheError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreWriteError,
)
from kdcache.logits.encodings import SampledEncoding, TopKEncoding, parse_encoding
from kdcache.logits.fidelity import FidelityAccumulator, sample_stride
from kdcache.logits.reduced import DrawnRows, ReducedRows, reduces
from kdcache.logits.sparse import as_numpy
from kdcache.store.format.digests import DIGESTS_ARRAY, chunk_digests
from kdcache.store.format.layout import (
    WRITTEN_ARRAY,
    StoreLike,
    open_array,
    row_ranges,
)
from kdcache.store.format.location import (
    forget_cached_listings,
    parse_location,
    refuse_inside_store,
    zarr_store,
)
from kdcache.store.format.metadata import (
    ATTRIBUTE_KEY,
    FORMAT_VERSION,
    PLAIN_FORMAT_VERSION,
    StoreMetadata,
)
from kdcache.store.write.chunk_files import ChunkFiles
from kdcache.store.write.creation import (
    checked_further_arrays,
    checked_labels,
    checked_sizes,
    checked_view_params,
)
from kdcache.store.write.durability import ChunkSync
from kdcache.store.write.locking import WriterLock, acquire_writer_lock
from kdcache.store.write.swap import remove_store_folder, swap_in
from kdcache.store.write.target import open_for_writing

__all__ = [
    "StoreWriter",
    "create_store",
]


class StoreWriter:
    """Accepts logits for any rows in any order and stores every chunk as soon as it is full.

    Whole contiguous chunks are the fast path: they go to disk without waiting for other rows.
    Call :meth:`finalize` once every row is written; the store is complete only after it.
    :meth:`write` may be called from several threads at once (kdcache.store.write.background): the
    checks, the encoding, the fidelity and the compression of distinct chunks run in parallel
    (numpy, zstd and file writes release the GIL); only placing rows into chunk buffers is
    serialised. Each chunk is written whole by one thread, so no two threads share a Zarr chunk.
    """

    def __init__(
        self,
        group: zarr.Group,
        metadata: StoreMetadata,
        where: str,
        lock: WriterLock | None = None,
        *,
        replaces: tuple[Path, Path] | None = None,
        sync: ChunkSync | None = None,
    ) -> None:
        self._group = group
        self._where = where
        self._lock = lock
        #: (staging folder, store folder) when this writer builds a replacement (--overwrite).
        self._replaces = replaces
        self._sync = sync
        self.metadata = metadata
        self.encoding = parse_encoding(metadata.encoding, num_classes=metadata.num_classes)
        self._layout = self.encoding.layout(metadata.num_classes)
        # Store every chunk, even one equal to the fill value, so a missing chunk file is damage.
        self._arrays = {
            name: open_array(group, name, where).with_config({"write_empty_chunks": True})
            for name in self._layout
        }
        self._written_array = open_array(group, WRITTEN_ARRAY, where)
        self._written = np.asarray(self._written_array[:], dtype=bool)
        self._digest_names = list(metadata.digests["arrays"]) if metadata.digests else []
        self._digests_array = (
            open_array(group, DIGESTS_ARRAY, where) if self._digest_names else None
        )
        on_disk = dict(self._arrays)
        on_disk[WRITTEN_ARRAY] = self._written_array
        if self._digests_array is not None:
            on_disk[DIGESTS_ARRAY] = self._digests_array
        #: Writes row chunks past zarr's event loop (local stores with known codecs).
        self._files = ChunkFiles.for_arrays(on_disk)
        self._buffers: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
        #: Guards the buffers, the written flags in memory and the lock's refresh.
        self._mutex = threading.Lock()
        #: Chunks a thread is writing now: their rows arriving again are not buffered twice.
        self._flushing: set[int] = set()
        #: Fidelity of the encoding over the rows this writer stored (kdcache.logits.fidelity).
        self.fidelity = FidelityAccumulator(
            self.encoding, sample_every=sample_stride(metadata.num_rows)
        )

    @property
    def num_chunks(self) -> int:
        return len(self._written)

    @property
    def replacing(self) -> bool:
        """Whether this writer builds a replacement (``overwrite=True`` over an existing store)
        that :meth:`finalize` swaps in."""
        return self._replaces is not None

    @property
    def group(self) -> zarr.Group:
        """The group this writer fills: under --overwrite, the replacement's staging group."""
        return self._group

    def pending_indices(self) -> np.ndarray:
        """Rows whose chunk is not yet durably written (all rows of a fresh store); row
        ``sample * views + view`` in a store with views."""
        return self.metadata.rows_of_chunks(np.flatnonzero(~self._written))

    def write(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor
    ) -> None:
        """Store raw logits ``(B, C)`` for the rows ``(B,)``: sample indices, or
        ``sample * views + view`` in a store with views.

        Refuses (:class:`InvalidLogitsError`, nothing stored) indices that are not integers in
        range, rows that are not finite, and rows the encoding cannot hold (e.g. beyond
        float16's 65504), which a reader would refuse as damage."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().to("cpu", torch.float32).numpy()
        rows = _checked_rows(indices, self.metadata.num_rows)
        # Overflow (to float32, then in the encoding) is refused by the checks, not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            block = np.asarray(logits, dtype=np.float32)
            self._check_block(rows, block)
            encoded = self.encoding.encode_views(block, rows // self.metadata.views)
        self._check_encoded(rows, block, encoded)
        chunk_of_row = rows // self.metadata.chunk_rows
        with self._mutex:
            new_rows = ~self._written[chunk_of_row]
        self.fidelity.update(block, encoded, indices=rows, keep=new_rows)
        self._store_encoded(rows, chunk_of_row, encoded)

    def write_reduced(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, reduced: ReducedRows | DrawnRows
    ) -> None:
        """Store rows reduced on the teacher's device (:func:`kdcache.logits.reduced.reduce_rows`)
        for the rows ``(B,)``, as :meth:`write` stores their raw logits; the fidelity is measured
        on the full rows that came along. Refuses (nothing stored) what :meth:`write` refuses,
        checked on the kept values and statistics (or, for draws, the device's finiteness check)."""
        if not reduces(self.encoding) or isinstance(reduced, DrawnRows) != isinstance(
            self.encoding, SampledEncoding
        ):
            kind = "sampled:S draws" if isinstance(reduced, DrawnRows) else "topk:K rows"
            raise InvalidLogitsError(
                f"{kind} reduced on the device do not fit this store's encoding "
                f"{self.encoding.name}: write its raw logits"
            )
        rows = _checked_rows(indices, self.metadata.num_rows)
        if reduced.num_classes != self.metadata.num_classes:
            raise InvalidLogitsError(
                f"rows reduced from logits of {reduced.num_classes} classes for samples "
                f"{row_ranges(np.unique(rows))}, but the store has {self.metadata.num_classes}; "
                f"the teacher's output width must equal the store's {self.metadata.num_classes} "
                "classes"
            )
        if isinstance(reduced, DrawnRows):
            encoded = self._encode_drawn(rows, reduced)
        else:
            encoded = self._encode_top(rows, reduced)
        chunk_of_row = rows // self.metadata.chunk_rows
        with self._mutex:
            new_rows = ~self._written[chunk_of_row]
        measured = as_numpy(reduced.measured).astype(bool)
        self.fidelity.update(
            as_numpy(reduced.measured_logits),
            {name: values[measured] for name, values in encoded.items()},
            indices=rows[measured],
            keep=new_rows[measured],
        )
        self._store_encoded(rows, chunk_of_row, encoded)

    def _encode_top(self, rows: np.ndarray, reduced: ReducedRows) -> dict[str, np.ndarray]:
        assert isinstance(self.encoding, TopKEncoding)  # write_reduced checked
        values, ids, tail = (
            as_numpy(part) for part in (reduced.values, reduced.indices, reduced.tail)
        )
        kept = np.concatenate([values, tail], axis=1)
        if kept.shape[0] != rows.size or values.shape[1] != self.encoding.k:
            raise InvalidLogitsError(
                f"expected {rows.size} reduced rows of {self.encoding.k} values for samples "
                f"{row_ranges(np.unique(rows))}, got {tuple(values.shape)}"
            )
        _refuse_non_finite(rows, kept)
        with np.errstate(over="ignore", invalid="ignore"):
            encoded = self.encoding.encode_selected(values, ids, tail)
        self._check_encoded(rows, kept, encoded)
        return encoded

    def _encode_drawn(self, rows: np.ndarray, drawn: DrawnRows) -> dict[str, np.ndarray]:
        assert isinstance(self.encoding, SampledEncoding)  # write_reduced checked
        classes, counts = as_numpy(drawn.classes), as_numpy(drawn.counts)
        finite = as_numpy(drawn.finite).astype(bool)
        if classes.shape != (rows.size, self.encoding.num_draws) or counts.shape != classes.shape:
            raise InvalidLogitsError(
                f"expected {rows.size} drawn rows of {self.encoding.num_draws} classes for "
                f"samples {row_ranges(np.unique(rows))}, got {tuple(classes.shape)}"
            )
        _refuse_rows_not_finite(rows, ~finite)
        # Classes and counts only: no value that could overflow the encoding.
        return self.encoding.encode_drawn(classes, counts)

    def write_encoded(
        self, indices: Sequence[int] | np.ndarray, encoded: dict[str, np.ndarray]
    ) -> None:
        """Store rows already in this store's encoding (every array of its layout, ``(B, ...)``),
        as read from another store of the same encoding and class count: copied bit for bit,
        where decoding and encoding again would redraw a ``sampled:S`` row or flatten a
        ``topk:K`` row's tail. The fidelity is not measured for such rows (there are no logits).

        Refuses (:class:`InvalidLogitsError`, nothing stored) arrays missing from the layout or
        of another shape or dtype, and rows a reader would refuse (non-finite values, values
        outside the encoding's :meth:`~kdcache.logits.encodings.Encoding.value_ranges`)."""
        rows = _checked_rows(indices, self.metadata.num_rows)
        if set(encoded) != set(self._layout):
            raise InvalidLogitsError(
                f"encoded rows must hold the arrays {sorted(self._layout)} of encoding "
                f"{self.encoding.name}, got {sorted(encoded)}"
            )
        for name, (shape, dtype) in self._layout.items():
            values = encoded[name]
            if values.shape != (rows.size, *shape) or values.dtype != dtype:
                raise InvalidLogitsError(
                    f"encoded array {name!r} must have shape {(rows.size, *shape)} and dtype "
                    f"{np.dtype(dtype)} for encoding {self.encoding.name}, got {values.shape} "
                    f"{values.dtype}"
                )
        for name, value_range in self.encoding.value_ranges(self.metadata.num_classes).items():
            outside = value_range.outside(encoded[name])
            if outside.any():
                raise InvalidLogitsError(
                    f"encoded rows: {value_range.problem(name, encoded[name], outside)} for "
                    f"samples {row_ranges(np.sort(rows[outside]))}; copy rows only from a store "
                    "that verifies"
                )
        bad = self.encoding.unrepresentable_rows(encoded)
        if bad.any():
            raise InvalidLogitsError(
                f"encoded rows for samples {row_ranges(np.sort(rows[bad]))} hold NaN or Inf; "
                "copy rows only from a store that verifies"
            )
        self._store_encoded(rows, rows // self.metadata.chunk_rows, encoded)

    def _store_encoded(
        self, rows: np.ndarray, chunk_of_row: np.ndarray, encoded: dict[str, np.ndarray]
    ) -> None:
        """Buffer encoded rows and write the chunks they complete."""
        full = self._buffer_rows(rows, chunk_of_row, encoded)
        try:
            for chunk, buffers in full:
                self._flush(chunk, buffers)
        finally:
            with self._mutex:
                self._flushing.difference_update(chunk for chunk, _ in full)

    def _buffer_rows(
        self, rows: np.ndarray, chunk_of_row: np.ndarray, encoded: dict[str, np.ndarray]
    ) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Place encoded rows into their chunks' buffers; return the chunks now full (marked as
        being written only once all are placed, so a failure here leaves none marked)."""
        full = []
        with self._mutex:
            for chunk in np.unique(chunk_of_row):
                chunk = int(chunk)
                if self._written[chunk] or chunk in self._flushing:
                    continue  # already stored (a resumed dump may recompute a partial batch)
                start, stop = self.metadata.chunk_bounds(chunk)
                buffers, filled = self._buffers.get(chunk) or self._new_buffer(stop - start)
                selected = chunk_of_row == chunk
                local = rows[selected] - start
                for name, values in encoded.items():
                    buffers[name][local] = values[selected]
                filled[local] = True
                if filled.all():
                    self._buffers.pop(chunk, None)
                    full.append((chunk, buffers))
                else:
                    self._buffers[chunk] = (buffers, filled)
            self._flushing.update(chunk for chunk, _ in full)
        return full

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
        _refuse_non_finite(rows, block)

    def _check_encoded(
        self, rows: np.ndarray, block: np.ndarray, encoded: dict[str, np.ndarray]
    ) -> None:
        """Refuse rows the encoding could not hold: a reader would refuse them as damage."""
        bad = self.encoding.unrepresentable_rows(encoded)
        if bad.any():
            overflowing = block[bad].astype(np.float64)
            largest = np.abs(overflowing).max()
            spread = (overflowing.max(axis=1) - overflowing.min(axis=1)).max()
            raise InvalidLogitsError(
                f"teacher logits for samples {row_ranges(np.sort(rows[bad]))} overflow the "
                f"encoding {self.encoding.name} (largest magnitude {largest:.6g}, widest row "
                f"spread {spread:.6g}); dump with --encoding float32, or check the teacher's "
                "output scale"
            )

    def _flush(self, chunk: int, buffers: dict[str, np.ndarray]) -> None:
        if self._files is not None:
            self._flush_files(self._files, chunk, buffers)
        else:
            self._flush_zarr(chunk, buffers)
        with self._mutex:
            self._written[chunk] = True
            if self._lock is not None:
                self._lock.refresh()

    def _flush_files(self, files: ChunkFiles, chunk: int, buffers: dict[str, np.ndarray]) -> None:
        """Encode and write the chunk in this thread (kdcache.store.write.chunk_files): the
        same files zarr writes, without queueing on zarr's event loop."""
        sync = self._sync is not None
        objects = [files.encode(name, chunk, values) for name, values in buffers.items()]
        if self._digests_array is not None:
            digests = chunk_digests(self.metadata.chunk_binding, self._digest_names, chunk, buffers)
            objects.append(files.encode(DIGESTS_ARRAY, chunk, digests[None]))
        files.put(objects, sync=sync)  # data and digests on disk before the flag can be
        # The flag goes last: a crash before it leaves the chunk marked unwritten.
        files.put([files.encode(WRITTEN_ARRAY, chunk, np.ones(1, dtype=np.uint8))], sync=sync)

    def _flush_zarr(self, chunk: int, buffers: dict[str, np.ndarray]) -> None:
        start, stop = self.metadata.chunk_bounds(chunk)
        for name, values in buffers.items():
            self._arrays[name][start:stop] = values
        if self._digests_array is not None:
            self._digests_array[chunk] = chunk_digests(
                self.metadata.chunk_binding, self._digest_names, chunk, buffers
            )
        if self._sync is not None:  # data and digests must be on disk before the flag can be
            arrays = [*self._arrays.values()]
            if self._digests_array is not None:
                arrays.append(self._digests_array)
            self._sync.chunk(arrays, chunk)
        # The flag goes last: a crash before it leaves the chunk marked unwritten.
        self._written_array[chunk] = 1
        if self._sync is not None:
            self._sync.chunk([self._written_array], chunk)

    def keep_lock(self) -> None:
        """Renew the writer lock (a remote lease) while the writer waits between writes."""
        with self._mutex:
            if self._lock is not None:
                self._lock.refresh()

    def finalize(self, *, verify: Callable[[Path], None] | None = None) -> StoreMetadata:
        """Mark the store complete (and swap a replacement into place); refuses while any row
        is missing.

        ``verify(folder)`` checks a replacement (``overwrite=True``) whose every row is written,
        before it is marked complete and swapped in, e.g.
        ``lambda folder: verify_store(folder, finishing=True).raise_if_bad()``: if it raises,
        the replacement is deleted, the old store stays as it was and the error names both.
        """
        # The flags in the store are the truth: other ranks of a torchrun job wrote chunks too,
        # and an object store's client may still answer from a listing made before they did.
        forget_cached_listings(self._group.store)
        self._written = np.asarray(self._written_array[:], dtype=bool)
        missing = self.pending_indices()
        if missing.size:
            raise StoreIncompleteError(
                f"cannot finalize {self._where}: no logits were written for samples "
                f"{row_ranges(missing)}; write every row before finalize()"
            )
        fidelity = self.fidelity.result()
        self.metadata = self.metadata.replace(
            fidelity=None if fidelity is None else fidelity.to_dict()
        )
        if self._replaces is not None and verify is not None:
            # Verified before it is marked complete: a replacement interrupted while it is being
            # verified stays an unfinished one, which --resume finishes and --overwrite clears.
            self._write_metadata()
            self._verify_replacement(self._replaces[0], verify)
        self.metadata = self.metadata.replace(complete=True)
        self._write_metadata()
        if self._replaces is not None:
            staging, target = self._replaces
            swap_in(staging, target, self._where)  # still under the lock: no writer meets a gap
            self._replaces = None
        self.close()
        return self.metadata

    def _write_metadata(self) -> None:
        self._group.attrs[ATTRIBUTE_KEY] = self.metadata.to_dict()
        if self._sync is not None:
            self._sync.metadata()

    def _verify_replacement(self, staging: Path, verify: Callable[[Path], None]) -> None:
        try:
            verify(staging)
        except KdcacheError as error:
            self._replaces = None
            remove_store_folder(staging)  # ours, built under the lock we still hold
            self.close()
            raise StoreCorruptError(
                f"{self._where} was not replaced: its new store failed verification, so it was "
                f"deleted and the old store kept as it was ({error})"
            ) from None

    def close(self) -> None:
        """Release the writer lock; an unfinished store stays resumable (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _checked_rows(indices: Sequence[int] | np.ndarray | torch.Tensor, num_rows: int) -> np.ndarray:
    """``indices`` as int64 rows, refusing anything but integers in ``[0, num_rows)``: a float
    index would otherwise be truncated into another sample's row."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    values = np.asarray(indices).reshape(-1)
    if not values.size:
        return values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise InvalidLogitsError(
            f"row indices must be integers, got {values.dtype} values such as "
            f"{values[:3].tolist()}; pass integer sample indices (e.g. an int64 array)"
        )
    low, high = values.min(), values.max()
    if low < 0 or high >= num_rows:
        raise InvalidLogitsError(
            f"row indices must lie in [0, {num_rows}), got values from {low} to {high}"
        )
    return values.astype(np.int64)


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
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    views: int = 1,
    augment: dict[str, Any] | None = None,
    view_params: np.ndarray | None = None,
    fsync: bool = True,
    arrays: dict[str, np.ndarray] | None = None,
) -> StoreWriter:
    """Create an empty store at ``path`` (or reopen an interrupted one) and return its writer.

    ``views=V`` stores V rows per sample (row ``sample * V + view``); ``view_params``
    ``(num_samples, V, P)`` float32 are the parameters that recreate each view's input and
    ``augment`` records how they were drawn (``recipe``, ``seed``, ``fields``: see
    kdcache.augment). Both are part of what a resume must match.

    ``resume=True`` continues an incomplete store made with the same parameters (or an
    interrupted replacement); ``overwrite=True`` replaces an existing kdcache store: a local
    one only once the new one is complete (and verifies, if ``finalize`` is given ``verify``;
    kdcache.store.write.swap). Anything else already at ``path`` is never touched. ``labels``
    must be integer classes in ``[0, num_classes)``. ``extra`` is recorded as the metadata's
    ``extra`` (a sequence store keeps its layout there). ``arrays`` (name: int64 values) are
    further arrays written once with the store, e.g. a sequence store's ``offsets``; like the
    labels and ``view_params`` they are digested and a resume must give the same values. The
    writer holds the store's single-writer lock (kdcache.store.write.locking) until ``finalize``
    or ``close``. ``fsync=False`` skips making each chunk durable before its flag
    (kdcache.store.write.durability).
    """
    location = parse_location(path).resolved()
    where = location.text
    if not (isinstance(views, int) and views >= 1):
        raise ConfigError(f"views must be an integer >= 1, got {views!r}")
    params = checked_view_params(view_params, num_samples, views, augment)
    codec = parse_encoding(encoding)
    rows = checked_sizes(codec, num_samples, num_classes, chunk_rows, views=views)
    label_values = checked_labels(labels, num_samples, num_classes)
    further = checked_further_arrays(arrays, reserved=codec.layout(num_classes))
    if location.folder is not None:
        refuse_inside_store(location.target, "the store path")

    metadata = StoreMetadata(
        num_samples=num_samples,
        num_classes=num_classes,
        encoding=encoding,
        chunk_rows=rows,
        teacher=teacher,
        dataset=dataset,
        extra=extra or {},
        kdcache_version=__version__,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        generation=uuid.uuid4().hex,
        views=views,
        augment=augment,
        # Older kdcache releases read stores without views; only views need the newer format.
        format_version=PLAIN_FORMAT_VERSION if views == 1 and params is None else FORMAT_VERSION,
    )
    store = zarr_store(location, read_only=False)
    lock = acquire_writer_lock(location)
    try:
        target = open_for_writing(
            location,
            store,
            metadata,
            codec,
            label_values,
            params,
            resume=resume,
            overwrite=overwrite,
            further=further,
        )
        writer = StoreWriter(target.group, target.metadata, where, lock, replaces=target.replaces)
        writer._sync = ChunkSync.for_location(location, enabled=fsync)
        if writer._sync is not None and writer._replaces is not None:
            writer._sync = ChunkSync(writer._replaces[0])  # a replacement is built in staging
        return writer
    except BaseException as error:
        lock.release()
        if isinstance(error, OSError) and not isinstance(error, KdcacheError):
            raise StoreWriteError(
                f"cannot write the store at {where}: {error.strerror or error}; choose a writable "
                "path with free space"
            ) from None
        raise


def _refuse_non_finite(rows: np.ndarray, values: np.ndarray) -> None:
    """Refuse teacher rows holding NaN or Inf, naming their samples."""
    _refuse_rows_not_finite(rows, ~np.isfinite(values).all(axis=1))


def _refuse_rows_not_finite(rows: np.ndarray, bad: np.ndarray) -> None:
    """Refuse the teacher rows ``bad`` (B,) marks as holding NaN or Inf, naming their samples."""
    if bad.any():
        raise InvalidLogitsError(
            f"teacher logits are NaN or Inf for samples {row_ranges(np.sort(rows[bad]))}; "
            "check the teacher's weights and inputs (values beyond float32's range are Inf)"
        )
