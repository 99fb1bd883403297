"""What every reader checks before it hands out a decoded row, so nothing wrong is used silently.

* **The arrays are the ones the store created**: shapes, dtypes, chunking and codecs match the
  pinned record (kdcache.store.format.pinning), checked once per array before its first decode.
* **Each chunk sits at its index**: its decoded values hash to the digest recorded for that
  chunk index (kdcache.store.format.digests). Stores written before the digest table existed are
  read unverified by index (``kdcache verify`` says so).
* **Each array written once is the one written**: labels, view_params, offsets, first_token
  (any array beside the row arrays) hash to the digest the record holds for it, checked when
  it is read (stores written before these digests existed are read unchecked).
* **The values are finite and in range**: every array the encoding declares a range for
  (:meth:`~kdcache.logits.encodings.Encoding.value_ranges`: class indices in [0, C), codes on
  their grid, draw counts, positive scales and depths) holds only values inside it.
* **The store is still the one opened**: its generation id is re-read after decoding; an
  overwritten store stops the reader instead of mixing two teachers' rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from kdcache.errors import StoreCorruptError, StoreFormatError
from kdcache.logits.encodings import parse_encoding
from kdcache.store.format._zarr_compat import read_group_key
from kdcache.store.format.digests import DIGEST_BYTES, DIGESTS_ARRAY, chunk_digest, whole_digest
from kdcache.store.format.layout import (
    FIRST_TOKEN_ARRAY,
    LABELS_ARRAY,
    OFFSETS_ARRAY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    first_line,
    has_array,
    missing_chunks,
    open_array,
    row_ranges,
    sequence_count,
)
from kdcache.store.format.location import ZIP_ERRORS
from kdcache.store.format.metadata import ATTRIBUTE_KEY, StoreMetadata
from kdcache.store.format.pinning import array_problems

__all__ = [
    "DECODE_ERRORS",
    "ChunkGuard",
    "decode_rows",
]

#: What zarr raises for chunk bytes that do not decode (checksum mismatch, zstd frame errors).
DECODE_ERRORS = (ValueError, RuntimeError, *ZIP_ERRORS)


def _expected_arrays(metadata: StoreMetadata, layout: dict[str, Any]) -> dict[str, Any]:
    """Shape, dtype and chunks every array of the store must have, keyed by name."""
    n, rows, chunks = metadata.num_rows, metadata.chunk_rows, metadata.num_chunks
    expected = {
        name: ((n, *shape), np.dtype(dtype), (rows, *shape))
        for name, (shape, dtype) in layout.items()
    }
    expected[WRITTEN_ARRAY] = ((chunks,), np.dtype("uint8"), (1,))
    if metadata.digests:
        width = len(metadata.digests["arrays"])
        shape = (width, DIGEST_BYTES)
        expected[DIGESTS_ARRAY] = ((chunks, *shape), np.dtype("uint8"), (1, *shape))
    return expected


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value of a floating array is finite; float16 by its exponent bits, about
    ten times faster than numpy's isfinite on float16."""
    if values.dtype == np.float16:
        exponent = np.ascontiguousarray(values).view(np.uint16) & 0x7C00
        return not bool((exponent == 0x7C00).any())
    return bool(np.isfinite(values).all())


class ChunkGuard:
    """The checks of one open store; ``group`` returns its (per-process) Zarr group."""

    def __init__(
        self, metadata: StoreMetadata, layout: dict[str, Any], where: str, group: Callable[[], Any]
    ) -> None:
        self.metadata = metadata
        self.where = where
        self._group = group
        self._expected = _expected_arrays(metadata, layout)
        self._ranges = parse_encoding(metadata.encoding).value_ranges(metadata.num_classes)
        self._checked: set[str] = set()
        #: Arrays opened from the group below: opening one rereads its zarr.json (a request on
        #: a remote store), which would otherwise cost each chunk read one more round trip.
        self._opened: tuple[Any, dict[str, Any]] | None = None
        self._digests: np.ndarray | None = None
        #: Decoding threads check chunks at once: the digest table is read by the first only.
        self._digests_lock = threading.Lock()
        self._must_match: np.ndarray | None = None
        #: Arrays written once whose digest this reader has checked.
        self._verified: set[str] = set()

    def array(self, name: str) -> Any:
        """The array ``name``, refused if it departs from what the store created."""
        group = self._group()
        if self._opened is None or self._opened[0] is not group:
            self._opened = (group, {})  # a new group: the reader reopened it in a forked child
        arrays = self._opened[1]
        if name in self._checked and name in arrays:
            return arrays[name]
        array = open_array(group, name, self.where)
        if name in self._checked:
            arrays[name] = array
            return array
        pinned = (self.metadata.arrays or {}).get(name)
        if name in self._expected:
            shape, dtype, chunks = self._expected[name]
            found = array_problems(array, pinned=pinned, shape=shape, dtype=dtype, chunks=chunks)
        else:
            shape, dtype = self.whole_shape(name, array)
            found = array_problems(
                array, pinned=pinned, shape=shape, dtype=dtype, chunks=tuple(array.chunks)
            )
        if found:
            raise StoreFormatError(
                f"{self.where}: array {name!r} has {'; '.join(found)}; its zarr.json was edited or "
                "replaced: restore it from a good copy or dump the store again"
            )
        self._checked.add(name)
        arrays[name] = array
        return array

    def whole_shape(self, name: str, array: Any) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype an array written once with the store must have, from the record."""
        meta = self.metadata
        if name == LABELS_ARRAY:
            return (meta.num_samples,), np.dtype("int64")
        if name == VIEW_PARAMS_ARRAY:
            # Its codecs include a transpose: an edited zarr.json would scramble the views.
            fields = (meta.augment or {}).get("fields")
            width = len(fields) if fields is not None else (array.shape or (0,))[-1]
            return (meta.num_samples, meta.views, width), np.dtype("float32")
        sequences = sequence_count(meta)
        if name == OFFSETS_ARRAY and sequences is not None:
            return (sequences + 1,), np.dtype("int64")
        if name == FIRST_TOKEN_ARRAY and sequences is not None:
            return (sequences,), np.dtype("int64")
        return tuple(array.shape), array.dtype

    def whole(self, name: str) -> np.ndarray:
        """Every value of the array ``name`` written once with the store (labels, view_params,
        offsets, ...), decoded and checked against its recorded digest."""
        array = self.present(name)
        try:
            values = np.asarray(array[:])
        except DECODE_ERRORS as error:
            raise self._undecodable(name, error) from None
        self.check_whole(name, values)
        return values

    def present(self, name: str) -> Any:
        """The array ``name``, refused if a chunk of it is missing (zarr would read it as fill
        values, which an older store's missing digest could not tell)."""
        array = self.array(name)
        if array.ndim and missing_chunks(array, np.arange(array.cdata_shape[0])).size:
            raise StoreCorruptError(
                f"{self.where}: array {name!r} lacks some of its chunks (deleted or lost in a "
                "copy); run `kdcache verify`, then restore the store or dump it again"
            )
        return array

    def check_whole(self, name: str, values: np.ndarray) -> None:
        """Refuse ``values``, all of the array ``name`` as decoded, unless they match its
        recorded digest (stores written before these digests: no check)."""
        self._check_whole(name, values.shape, values.dtype, [values])

    def verify_whole(self, name: str) -> None:
        """Check the array ``name`` against its recorded digest without holding it in memory
        (once per reader): for arrays read in slices afterwards, such as a sequence store's
        labels."""
        if name in self._verified:
            return
        array = self.present(name)
        step = max(1, int(array.chunks[0])) if array.ndim else 1

        def blocks() -> Any:
            for start in range(0, array.shape[0] if array.ndim else 1, step):
                try:
                    yield np.asarray(array[start : start + step] if array.ndim else array[...])
                except DECODE_ERRORS as error:
                    raise self._undecodable(name, error) from None

        self._check_whole(name, tuple(array.shape), array.dtype, blocks())

    def _check_whole(self, name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Any) -> None:
        recorded = (self.metadata.digests or {}).get("whole")
        if recorded is None:  # an older store: no digest to check
            for _ in blocks:
                pass
        elif name not in recorded:
            raise StoreCorruptError(
                f"{self.where}: array {name!r} is not covered by the store's digests (added "
                "after it was written); remove it, restore the store or dump it again"
            )
        elif whole_digest(name, shape, dtype, blocks) != recorded[name]:
            self.check_unchanged()
            raise StoreCorruptError(
                f"{self.where}: array {name!r} does not match the digest recorded for it "
                "(edited, replaced, or chunks swapped or taken from another store); run "
                "`kdcache verify`, then restore the store or dump it again"
            )
        self._verified.add(name)

    def _undecodable(self, name: str, error: BaseException) -> StoreCorruptError:
        return StoreCorruptError(
            f"{self.where}: array {name!r} does not decode ({first_line(error)}); run "
            "`kdcache verify`, then restore the store or dump it again"
        )

    def whole_arrays(self) -> list[str]:
        """The arrays written once with the store that it holds or must hold: every one it
        recorded a digest or pinned metadata for, and any present of the known ones."""
        meta = self.metadata
        named = {
            *((meta.digests or {}).get("whole") or {}),
            *(set(meta.arrays or {}) - set(self._expected)),
        }
        group = self._group()
        present = [
            name
            for name in (LABELS_ARRAY, VIEW_PARAMS_ARRAY, OFFSETS_ARRAY, FIRST_TOKEN_ARRAY)
            if has_array(group, name)
        ]
        return sorted(named | set(present))

    def check_all_arrays(self) -> None:
        """Every array a complete store needs is present and as created (an array written once
        that is missing is refused where it is needed, by what needs it)."""
        for name in self._expected:
            self.array(name)
        for name in self.whole_arrays():
            if has_array(self._group(), name):
                self.array(name)

    def written(self) -> np.ndarray:
        """Per row chunk, whether its flag says it was written (StoreCorruptError if unreadable)."""
        if not has_array(self._group(), WRITTEN_ARRAY):  # killed while creating the store
            return np.zeros(self.metadata.num_chunks, dtype=bool)
        try:
            flags = np.asarray(self.array(WRITTEN_ARRAY)[:])
        except DECODE_ERRORS as error:
            raise StoreCorruptError(
                f"{self.where}: array {WRITTEN_ARRAY!r} does not decode ({first_line(error)}); "
                "run `kdcache verify` and dump again"
            ) from None
        if not np.isin(flags, (0, 1)).all():
            raise StoreCorruptError(
                f"{self.where}: array {WRITTEN_ARRAY!r} holds values other than 0 and 1 (damaged); "
                "run `kdcache verify` and dump again"
            )
        return flags.astype(bool)

    def _digest_table(self) -> np.ndarray:
        with self._digests_lock:
            return self._read_digest_table()

    def _read_digest_table(self) -> np.ndarray:
        if self._digests is None:
            try:
                self._digests = np.asarray(self.array(DIGESTS_ARRAY)[:])
            except DECODE_ERRORS as error:
                raise StoreCorruptError(
                    f"{self.where}: the digest table {DIGESTS_ARRAY!r} does not decode "
                    f"({first_line(error)}); run `kdcache verify` and dump again"
                ) from None
            complete = self.metadata.complete
            self._must_match = (
                np.ones(self.metadata.num_chunks, dtype=bool) if complete else self.written()
            )
        return self._digests

    def check_rows(self, name: str, start: int, values: np.ndarray) -> None:
        """Check rows ``start:start+len(values)`` (whole chunks) of ``name`` just decoded."""
        meta = self.metadata
        if meta.digests and name in meta.digests["arrays"]:
            table = self._digest_table()
            column = meta.digests["arrays"].index(name)
            assert self._must_match is not None
            first = start // meta.chunk_rows
            for chunk in range(first, first + -(-len(values) // meta.chunk_rows)):
                if not self._must_match[chunk]:
                    continue
                low, high = meta.chunk_bounds(chunk)
                piece = values[low - start : high - start]
                if not np.array_equal(
                    chunk_digest(meta.chunk_binding, name, chunk, piece), table[chunk, column]
                ):
                    self.check_unchanged()
                    raise StoreCorruptError(
                        f"{self.where}: array {name!r} holds, for samples {low}-{high - 1}, a "
                        f"chunk that does not match the digest recorded for chunk {chunk} (moved, "
                        "swapped, replaced or edited); run `kdcache verify`, then restore the "
                        "store or dump it again"
                    )
        if np.issubdtype(values.dtype, np.floating) and not _all_finite(values):
            bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
            if bad.size:
                raise StoreCorruptError(
                    f"{self.where}: array {name!r} holds NaN or Inf for samples "
                    f"{row_ranges(start + bad)} (kdcache never writes them: the store was "
                    "altered); run `kdcache verify` and dump again"
                )
        value_range = self._ranges.get(name)
        if value_range is not None:
            outside = value_range.outside(values)
            if outside.any():
                raise StoreCorruptError(
                    f"{self.where}: {value_range.problem(name, values, outside)} for samples "
                    f"{row_ranges(start + np.flatnonzero(outside))} (kdcache never writes it: "
                    "the store was altered); run `kdcache verify` and dump again"
                )

    def check_unchanged(self) -> None:
        """Stop if the store's metadata now names another generation (it was overwritten)."""
        try:
            raw = read_group_key(self._group(), "zarr.json")
            record = json.loads(raw or b"null")["attributes"][ATTRIBUTE_KEY]
            now = (record.get("generation", ""), record.get("created_at", ""))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, *ZIP_ERRORS):
            now = None
        if now != (self.metadata.generation, self.metadata.created_at):
            raise StoreCorruptError(
                f"{self.where} changed while it was being read (overwritten by another dump, or "
                "its metadata replaced); rows read so far may mix two stores: reopen it and start "
                "the run again"
            )


def decode_rows(array: Any, start: int, stop: int, where: str, chunk_rows: int) -> np.ndarray:
    """Rows ``start:stop`` of ``array``; a block that fails is reread chunk by chunk so that the
    error names the corrupted samples."""
    try:
        return array[start:stop]
    except DECODE_ERRORS:
        pass
    parts = []
    for chunk_start in range(start, stop, chunk_rows):
        chunk_stop = min(chunk_start + chunk_rows, stop)
        try:
            parts.append(array[chunk_start:chunk_stop])
        except DECODE_ERRORS as error:
            raise StoreCorruptError(
                f"{where}: array {array.basename!r} is corrupted for samples "
                f"{chunk_start}-{chunk_stop - 1} ({first_line(error)}); run `kdcache verify` and "
                "dump again"
            ) from None
    return np.concatenate(parts)
