"""Check a whole store before trusting or sharing it: checksums, values and metadata.

:func:`verify_store` decodes every written chunk (zstd + crc32c) and reports, as sample-index
ranges, the chunks that fail to decode, are missing or do not match the digest recorded for
their index (moved, swapped or replaced), the rows holding NaN or Inf, arrays whose shape,
dtype, chunking or codecs disagree with the metadata, labels that disagree with the recorded
dataset fingerprint, and how far an unfinished dump got. Every array written once with the
store (labels, view_params, a sequence store's offsets and first_token) is decoded and checked
against its recorded digest, and the sequence layout against the token rows; the record itself
is checked against its digest when the store is opened. Stores written before these digests
existed are reported with a note, not a problem.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import StoreCorruptError, StoreError
from kdcache.progress import progress
from kdcache.store.format.digests import DIGESTS_ARRAY, chunk_digest
from kdcache.store.format.layout import (
    FIRST_TOKEN_ARRAY,
    LABELS_ARRAY,
    OFFSETS_ARRAY,
    SEQUENCE_KEY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    ZARR_METADATA_ERRORS,
    StoreLike,
    first_line,
    has_array,
    missing_chunks,
    row_ranges,
)
from kdcache.store.format.location import parse_location, partial_files
from kdcache.store.format.pinning import array_problems
from kdcache.store.read.guard import DECODE_ERRORS as _DECODE_ERRORS
from kdcache.store.read.in_memory import LOAD_BLOCK_CHUNKS
from kdcache.store.read.reader import JoinedReader, StoreReader, open_store
from kdcache.store.sequence import sequence_problems
from kdcache.wording import counted

__all__ = [
    "VerifyReport",
    "verify_store",
]


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` found; ``problems`` empty means the store can be trusted."""

    where: str
    num_samples: int
    num_classes: int
    encoding: str
    chunks_checked: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    #: V, the augmented views stored per sample (N x V rows).
    views: int = 1

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as text, one finding per line."""
        head = (
            f"{self.where}: N={self.num_samples}{f' V={self.views}' if self.views > 1 else ''} "
            f"C={self.num_classes} {self.encoding}, "
            f"{counted(self.chunks_checked, 'chunk')} decoded"
        )
        body = [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        tail = "OK" if self.ok else f"FAILED: {counted(len(self.problems), 'problem')}"
        return [head, *body, tail]

    def raise_if_bad(self) -> None:
        """Raise :class:`StoreCorruptError` summarising the problems in one line."""
        if self.problems:
            raise StoreCorruptError(
                f"{self.where} failed verification with {counted(len(self.problems), 'problem')}, "
                f"first: {self.problems[0]}; do not train from it: finish it with --resume if "
                "unfinished, else dump it again with --overwrite"
            )


def verify_store(path: StoreLike, *, finishing: bool = False) -> VerifyReport:
    """Read everything in the store at ``path`` (folder, URL or .zip) and report what is wrong.

    ``finishing=True`` checks a store whose writer wrote every row but has not marked it
    complete yet (a replacement verified before its swap): only the missing flag is not a problem.
    """
    location = parse_location(path)
    reader = open_store(location, allow_incomplete=True)
    if isinstance(reader, JoinedReader):
        return _verify_joined(reader)
    meta = reader.metadata
    problems: list[str] = []
    written = _written_chunks(reader, problems)
    if not meta.complete and not finishing:
        problems.append(
            f"unfinished dump: {reader.progress()} written; finish it with "
            "`kdcache dump-teacher --resume`"
        )
    elif not written.all():
        problems.append(
            f"chunks for {_unit(reader)} "
            f"{row_ranges(meta.rows_of_chunks(np.flatnonzero(~written)))} were never written"
            + (" although the store is marked complete" if meta.complete else "")
        )
    checked = 0
    digests = _digest_table(reader, problems)
    for name, (row_shape, dtype) in reader.encoding.layout(meta.num_classes).items():
        array = _checked_array(reader, name, (meta.num_rows, *row_shape), np.dtype(dtype), problems)
        if array is not None:
            checked += _scan(reader, array, written, digests, problems)
    whole = _whole_arrays(reader, problems)
    _check_labels(reader, whole.get(LABELS_ARRAY), problems)
    _check_view_params(reader, whole.get(VIEW_PARAMS_ARRAY), problems)
    _check_sequences(reader, whole, problems)
    notes = []
    if not meta.digests:
        notes.append(
            "written before kdcache recorded chunk digests: chunks are checksummed but not bound "
            "to their index (a chunk moved or swapped within an array would go unnoticed)"
        )
    elif "record" not in meta.digests and reader.guard.whole_arrays():
        unbound = ", ".join(reader.guard.whole_arrays())
        notes.append(
            f"written before kdcache digested its record and {unbound}: "
            "those are checksummed and range-checked but an edit that stays in range would go "
            "unnoticed; dump again to bind them"
        )
    leftovers = partial_files(location)
    if leftovers:
        notes.append(
            f"{counted(len(leftovers), 'temporary file')} of a killed writer, e.g. {leftovers[0]}; "
            "harmless, `kdcache dump-teacher --resume` removes them"
        )
    return VerifyReport(
        where=location.text,
        num_samples=meta.num_samples,
        num_classes=meta.num_classes,
        encoding=meta.encoding,
        chunks_checked=checked,
        problems=tuple(problems),
        notes=tuple(notes),
        views=meta.views,
    )


def _verify_joined(reader: JoinedReader) -> VerifyReport:
    """A joined store: opening it checked that every part is the one joined (generation and
    digests) and that together they hold each sample once; each part is then verified whole."""
    reports = [verify_store(part.where) for part in reader.parts]
    problems = [
        f"part {report.where}: {problem}" for report in reports for problem in report.problems
    ]
    _check_labels(reader, reader.labels, problems)
    notes = [f"part {report.where}: {note}" for report in reports for note in report.notes]
    notes.insert(
        0,
        f"a joined store: {counted(len(reports), 'part')} read in place, each the store that was "
        "joined, together holding every sample once",
    )
    meta = reader.metadata
    return VerifyReport(
        where=reader.where,
        num_samples=meta.num_samples,
        num_classes=meta.num_classes,
        encoding=meta.encoding,
        chunks_checked=sum(report.chunks_checked for report in reports),
        problems=tuple(problems),
        notes=tuple(notes),
        views=meta.views,
    )


def _unit(reader: StoreReader) -> str:
    """What row indices are: samples, or ``sample * V + view`` rows in a store with views."""
    return "samples" if reader.metadata.views == 1 else "rows"


def _written_chunks(reader: StoreReader, problems: list[str]) -> np.ndarray:
    num_chunks = reader.metadata.num_chunks
    if not has_array(reader.group, WRITTEN_ARRAY):
        if not reader.metadata.complete:
            return np.zeros(num_chunks, dtype=bool)  # killed while creating the store
        problems.append(f"array {WRITTEN_ARRAY!r} is missing; which chunks were written is unknown")
        return np.ones(num_chunks, dtype=bool)
    try:
        return reader.guard.written()
    except StoreError as error:
        problems.append(_problem(error))
        return np.ones(num_chunks, dtype=bool)


def _digest_table(reader: StoreReader, problems: list[str]) -> np.ndarray | None:
    """The per-chunk digest table, or ``None`` (old store, or unreadable: a problem)."""
    if not reader.metadata.digests:
        return None
    try:
        return np.asarray(reader.guard.array(DIGESTS_ARRAY)[:])
    except StoreError as error:
        problems.append(_problem(error))
    except _DECODE_ERRORS as error:
        problems.append(f"the digest table {DIGESTS_ARRAY!r} does not decode ({first_line(error)})")
    return None


def _checked_array(
    reader: StoreReader, name: str, shape: tuple[int, ...], dtype: np.dtype, problems: list[str]
) -> Any:
    """The array ``name`` if it matches the metadata, else ``None`` with the mismatch recorded."""
    if not has_array(reader.group, name):
        problems.append(
            f"array {name!r} required by encoding {reader.metadata.encoding!r} is missing"
        )
        return None
    try:
        array = reader.group[name]
    except ZARR_METADATA_ERRORS as error:
        problems.append(f"array {name!r} has an unreadable zarr.json ({first_line(error)})")
        return None
    found = array_problems(
        array,
        pinned=(reader.metadata.arrays or {}).get(name),
        shape=shape,
        dtype=dtype,
        chunks=(reader.metadata.chunk_rows, *shape[1:]),
    )
    if found:
        problems.append(f"array {name!r} has {', '.join(found)}")
        return None
    return array


def _scan(
    reader: StoreReader,
    array: Any,
    written: np.ndarray,
    digests: np.ndarray | None,
    problems: list[str],
) -> int:
    """Decode every written chunk of ``array``; record undecodable, missing, misplaced and
    non-finite rows and values outside the range the encoding declares for the array."""
    meta = reader.metadata
    rows, n = meta.chunk_rows, reader.num_rows
    corrupt: list[np.ndarray] = []
    non_finite: list[np.ndarray] = []
    misplaced: list[np.ndarray] = []
    column = None
    if digests is not None and meta.digests is not None:
        column = meta.digests["arrays"].index(array.basename)
    check_values = np.issubdtype(array.dtype, np.floating)
    value_range = reader.encoding.value_ranges(reader.num_classes).get(array.basename)
    out_of_range: list[np.ndarray] = []
    found = ""
    chunks = np.flatnonzero(written)
    bar = progress(total=len(chunks), desc=f"verify {array.basename}", unit="chunk", leave=False)
    for first in range(0, len(chunks), LOAD_BLOCK_CHUNKS):
        block = chunks[first : first + LOAD_BLOCK_CHUNKS]
        start, stop = int(block[0]) * rows, min((int(block[-1]) + 1) * rows, n)
        values = None
        if block[-1] - block[0] + 1 == len(block):  # one read for a run of contiguous chunks
            # on a decoding error, values stays None: reread chunk by chunk to find the bad ones
            with contextlib.suppress(*_DECODE_ERRORS):
                values = [(start, array[start:stop])]
        if values is None:
            values = []
            for chunk in block:
                chunk_start, chunk_stop = int(chunk) * rows, min((int(chunk) + 1) * rows, n)
                try:
                    values.append((chunk_start, array[chunk_start:chunk_stop]))
                except _DECODE_ERRORS:
                    corrupt.append(np.arange(chunk_start, chunk_stop))
        for offset, data in values:
            if check_values:
                bad = ~np.isfinite(data.reshape(len(data), -1)).all(axis=1)
                non_finite.append(offset + np.flatnonzero(bad))
            if value_range is not None and (outside := value_range.outside(data)).any():
                found = found or value_range.problem(array.basename, data, outside)
                out_of_range.append(offset + np.flatnonzero(outside))
            if column is not None:
                misplaced += _misplaced(meta, array.basename, offset, data, digests, column)
        bar.update(len(block))
    bar.close()
    name = array.basename
    if misplaced:
        problems.append(
            f"array {name!r}: chunks do not match the digest recorded for their index (moved, "
            f"swapped, replaced or edited) for {_unit(reader)} "
            f"{row_ranges(np.concatenate(misplaced))}"
        )
    if corrupt:
        problems.append(
            f"array {name!r}: chunks fail their checksum or do not decode for {_unit(reader)} "
            f"{row_ranges(np.concatenate(corrupt))}"
        )
    missing = missing_chunks(array, chunks)
    if missing.size:
        problems.append(
            f"array {name!r}: chunks marked written are missing for {_unit(reader)} "
            f"{row_ranges(reader.metadata.rows_of_chunks(np.sort(missing)))}"
        )
    bad_rows = np.concatenate(non_finite) if non_finite else np.empty(0, dtype=np.int64)
    if bad_rows.size:
        problems.append(
            f"array {name!r}: NaN or Inf in {counted(bad_rows.size, 'row')}, {_unit(reader)} "
            f"{row_ranges(bad_rows)}"
        )
    if out_of_range:
        problems.append(f"{found} for {_unit(reader)} {row_ranges(np.concatenate(out_of_range))}")
    return len(chunks)


def _misplaced(
    meta: Any, name: str, offset: int, data: np.ndarray, digests: Any, column: int
) -> list[np.ndarray]:
    """The rows of the written chunks in ``data`` whose digest differs from the recorded one."""
    found = []
    first = offset // meta.chunk_rows
    for chunk in range(first, first + -(-len(data) // meta.chunk_rows)):
        low, high = meta.chunk_bounds(chunk)
        digest = chunk_digest(meta.chunk_binding, name, chunk, data[low - offset : high - offset])
        if not np.array_equal(digest, digests[chunk, column]):
            found.append(np.arange(low, high))
    return found


def _problem(error: StoreError) -> str:
    """A reader's one-line refusal as a verify problem (without the store's name and advice)."""
    return str(error).partition(": ")[2].partition("; ")[0] or str(error)


def _whole_arrays(reader: StoreReader, problems: list[str]) -> dict[str, np.ndarray]:
    """Every array written once with the store that decodes, matches its pinned metadata and
    its recorded digest, by name; what fails is recorded as a problem."""
    values = {}
    for name in reader.guard.whole_arrays():
        if not has_array(reader.group, name):
            problems.append(
                f"array {name!r} is missing but the metadata records it (deleted or lost in a copy)"
            )
            continue
        try:
            raw: Any = reader.group[name]
        except ZARR_METADATA_ERRORS as error:
            problems.append(f"array {name!r} has an unreadable zarr.json ({first_line(error)})")
            continue
        shape, _ = reader.guard.whole_shape(name, raw)
        if tuple(raw.shape) != shape:
            problems.append(f"array {name!r} has shape {tuple(raw.shape)}, expected {shape}")
            continue
        try:
            data = np.asarray(reader.guard.present(name)[:])
        except StoreError as error:
            problems.append(_problem(error))
            continue
        except _DECODE_ERRORS as error:
            problems.append(f"array {name!r} does not decode ({first_line(error)})")
            continue
        values[name] = data  # checked below for what else is wrong, digest or not
        try:
            reader.guard.check_whole(name, data)
        except StoreError as error:
            problems.append(_problem(error))
    return values


def _check_labels(reader: StoreReader, labels: np.ndarray | None, problems: list[str]) -> None:
    """Labels within [0, C) and matching the recorded dataset fingerprint."""
    fingerprint = (reader.metadata.dataset or {}).get("fingerprint") or {}
    for key in ("num_samples", "num_classes"):
        if key in fingerprint and fingerprint[key] != getattr(reader, key):
            problems.append(
                f"dataset fingerprint says {key}={fingerprint[key]} but the store has "
                f"{getattr(reader, key)}"
            )
    if labels is None:
        return
    labels = labels.astype(np.int64)
    out_of_range = np.flatnonzero((labels < 0) | (labels >= reader.num_classes))
    if out_of_range.size:
        problems.append(
            f"labels outside [0, {reader.num_classes}) for samples {row_ranges(out_of_range)}"
        )
    recorded = fingerprint.get("labels_sha256")
    actual = hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()
    if recorded and recorded != actual:
        problems.append(
            f"stored labels do not match the dataset fingerprint (sha256 {actual[:12]}… vs "
            f"recorded {recorded[:12]}…)"
        )


def _check_view_params(reader: StoreReader, params: np.ndarray | None, problems: list[str]) -> None:
    """The ``augment`` record complete, and ``view_params`` of shape (N, V, len(fields)) and
    finite, in a store with views. (Each record's ranges depend on its recipe: they are checked
    where the views are recreated, kdcache.augment.views.)"""
    meta = reader.metadata
    augment = meta.augment
    if augment is None:
        if meta.views > 1:
            problems.append(
                f"the store holds {meta.views} views per sample but records no augment recipe; "
                "the views cannot be recreated"
            )
        return
    for key, valid in (
        ("recipe", isinstance(augment.get("recipe"), str) and bool(augment.get("recipe"))),
        ("seed", isinstance(augment.get("seed"), int)),
        ("fields", isinstance(augment.get("fields"), list)),
    ):
        if not valid:
            problems.append(f"augment.{key} is {augment.get(key)!r}: the views cannot be recreated")
    fields = augment.get("fields")
    if params is None:
        reported = VIEW_PARAMS_ARRAY in reader.guard.whole_arrays()  # by _whole_arrays
        if not reported and not has_array(reader.group, VIEW_PARAMS_ARRAY):
            problems.append(
                f"array {VIEW_PARAMS_ARRAY!r} is missing but the metadata records the recipe "
                f"{augment.get('recipe')!r}; the views cannot be recreated"
            )
        return
    width = len(fields) if isinstance(fields, list) else params.shape[-1]
    if params.shape != (meta.num_samples, meta.views, width):
        problems.append(
            f"array {VIEW_PARAMS_ARRAY!r} has shape {params.shape}, expected "
            f"({meta.num_samples}, {meta.views}, {width}) for N={meta.num_samples}, "
            f"V={meta.views} and {width} parameter fields"
        )
        return
    bad = np.flatnonzero(~np.isfinite(params.reshape(meta.num_samples, -1)).all(axis=1))
    if bad.size:
        problems.append(f"array {VIEW_PARAMS_ARRAY!r}: NaN or Inf for samples {row_ranges(bad)}")


def _check_sequences(
    reader: StoreReader, values: dict[str, np.ndarray], problems: list[str]
) -> None:
    """A sequence store's offsets, first_token and sequence record agree with its token rows."""
    if not isinstance(reader.metadata.extra.get(SEQUENCE_KEY), dict):
        return
    missing = [name for name in (OFFSETS_ARRAY, FIRST_TOKEN_ARRAY) if name not in values]
    for name in missing:
        if not has_array(reader.group, name) and name not in reader.guard.whole_arrays():
            problems.append(f"array {name!r} of the sequence store is missing")
    if not missing:
        problems += sequence_problems(
            reader.metadata,
            values[OFFSETS_ARRAY].astype(np.int64),
            values[FIRST_TOKEN_ARRAY].astype(np.int64),
        )
