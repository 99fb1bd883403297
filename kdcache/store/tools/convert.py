"""Re-encode a complete store, or copy a subset of its samples, into a new store, chunk by chunk.

Image stores (with or without views) and token (sequence) stores alike; a subset keeps whole
samples: every view of a chosen sample, every token row of a chosen sequence.

The source is read one row chunk at a time (each chunk checked by the reader's guard), decoded to
dense float32 logits and written through :func:`~kdcache.store.write.writer.create_store`, so the
new store gets every writer guarantee: values the new encoding cannot hold are refused, every
array is digested, and ``overwrite=True`` swaps a replacement in only once it verifies. The
writer measures the fidelity of the new encoding against the rows it is given: the decoded
source rows. From a lossy source (``topk:K``, ``int8``, ``sampled:S``) that is the fidelity to
the source as stored, not to the original teacher; a ``topk:K`` source is decoded with its tail
filled for T = 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import ConfigError
from kdcache.logits.encodings import parse_encoding
from kdcache.logits.fidelity import Fidelity
from kdcache.store.format.layout import (
    DATASET_INDICES_ARRAY,
    FIRST_TOKEN_ARRAY,
    OFFSETS_ARRAY,
    SEQUENCE_KEY,
    StoreLike,
    has_array,
)
from kdcache.store.format.location import parse_location
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import SequenceReader, rows_of, sequence_offsets
from kdcache.store.tools.verified_write import write_verified_store
from kdcache.wording import counted

__all__ = [
    "CONVERTED_FROM_KEY",
    "ConvertResult",
    "convert_store",
    "recorded_dataset_indices",
]

#: Where the new store's metadata records what it was converted from (``extra``).
CONVERTED_FROM_KEY = "converted_from"
#: The temperature a ``topk:K`` source's dense rows are reconstructed at.
_SOURCE_DECODE_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ConvertResult:
    """The new store: where, how many samples (and views), its encoding and measured fidelity."""

    out: str
    #: Samples of the new store (sequences in a token store).
    num_samples: int
    views: int
    source_encoding: str
    encoding: str
    fidelity: Fidelity | None
    nbytes: int | None


def convert_store(
    source: StoreLike,
    out: StoreLike,
    *,
    encoding: str,
    indices: Sequence[int] | np.ndarray | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ConvertResult:
    """Write the complete store ``source`` into a new store ``out`` in ``encoding``.

    ``indices`` (sample indices of ``source``, each at most once) copies only those samples, in
    ascending order: sample i of ``out`` is the i-th smallest index, with its label and, in a
    store with views, all its views and their parameters. The teacher and dataset records,
    labels and augmentation record are kept; ``extra["converted_from"]`` records the source (its
    location, generation, content digest, encoding, size and the selected indices' sha256). A
    subset's dataset record keeps the source's under ``subset_of`` and drops its fingerprint,
    which describes the whole dataset. In a token (sequence) store the indices select whole
    sequences: their token rows, labels, first tokens and new offsets are copied.
    """
    source_location = parse_location(source)
    out_location = parse_location(out)
    _refuse_overlap(
        source_location.resolved().target, out_location.resolved().target, out_location.text
    )
    reader = open_store(source)  # refuses missing, foreign, damaged or unfinished stores
    metadata = reader.metadata
    sequences = (
        SequenceReader(reader) if isinstance(metadata.extra.get(SEQUENCE_KEY), dict) else None
    )
    codec = parse_encoding(encoding, num_classes=metadata.num_classes)
    chosen = _chosen_samples(indices, reader, sequences)
    samples = (
        np.arange(metadata.num_samples if sequences is None else sequences.num_sequences)
        if chosen is None
        else chosen
    )
    extra: dict[str, Any] = dict(metadata.extra)
    labels = reader.labels
    params = reader.view_params
    arrays: dict[str, np.ndarray] | None = None
    if sequences is None:
        # Sample s owns rows s * V .. s * V + V - 1, in the source as in the new store.
        source_starts = np.arange(metadata.num_samples + 1, dtype=np.int64) * metadata.views
        new_starts = np.arange(samples.size + 1, dtype=np.int64) * metadata.views
        if labels is not None:
            labels = labels[samples]
        num_samples = samples.size
    else:
        source_starts = sequences.offsets
        lengths = sequences.lengths[samples]
        new_starts = sequence_offsets(lengths)
        if labels is not None:
            labels = labels[rows_of(source_starts, samples)]
        arrays = {OFFSETS_ARRAY: new_starts, FIRST_TOKEN_ARRAY: sequences.first_token[samples]}
        extra[SEQUENCE_KEY] = {
            "num_sequences": int(samples.size),
            "num_tokens": int(new_starts[-1]),
            # Rows at the counted positions only do not tell a sample's length: keep the
            # source's bound.
            "max_length": int(lengths.max())
            if sequences.every_position
            else int(sequences.layout["max_length"]),
            **({} if sequences.every_position else {"every_position": False}),
        }
        num_samples = int(new_starts[-1])
    whole_indices = recorded_dataset_indices(reader)
    if chosen is not None or whole_indices is not None:
        # Which samples of the whole dataset OUT holds, so parts can be joined again.
        kept = samples if whole_indices is None else whole_indices[samples]
        arrays = {**(arrays or {}), DATASET_INDICES_ARRAY: kept}
    dataset = metadata.dataset
    if chosen is not None and dataset is not None:
        dataset = {
            key: value for key, value in dataset.items() if key not in ("fingerprint", "subset_of")
        }
        dataset["subset_of"] = metadata.dataset
    extra[CONVERTED_FROM_KEY] = {
        "store": source_location.resolved().target,
        "generation": metadata.generation,
        "content_sha256": reader.content_digest(),
        "record_digest": (metadata.digests or {}).get("record"),
        "encoding": metadata.encoding,
        "num_samples": metadata.num_samples,
        "indices_sha256": None
        if chosen is None
        else hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest(),
        "fidelity_against": "the decoded source rows"
        + (
            f" (tail filled at T={_SOURCE_DECODE_TEMPERATURE:g})"
            if reader.encoding.is_sparse
            else ""
        ),
    }
    written = write_verified_store(
        out,
        lambda writer: _copy_rows(reader, samples, source_starts, new_starts, writer.write),
        num_samples=num_samples,
        num_classes=metadata.num_classes,
        encoding=codec.name,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=metadata.teacher,
        dataset=dataset,
        extra=extra,
        overwrite=overwrite,
        views=metadata.views,
        augment=metadata.augment,
        view_params=None if params is None else params[samples],
        fsync=fsync,
        arrays=arrays,
    )
    fidelity = None if written.fidelity is None else Fidelity.from_dict(written.fidelity)
    return ConvertResult(
        out=out_location.text,
        num_samples=samples.size,
        views=metadata.views,
        source_encoding=metadata.encoding,
        encoding=codec.name,
        fidelity=fidelity,
        nbytes=out_location.nbytes(),
    )


def recorded_dataset_indices(reader: StoreReader) -> np.ndarray | None:
    """The dataset sample indices of a store that holds only some samples (``None`` for a
    store of the whole dataset)."""
    if not has_array(reader.group, DATASET_INDICES_ARRAY):
        return None
    return reader.guard.whole(DATASET_INDICES_ARRAY).astype(np.int64)


def _refuse_overlap(source: str, out: str, given: str) -> None:
    """Refuse an output that is the source, lies inside it, or holds it (a replacement would
    delete the source)."""
    if source == out:
        raise ConfigError(
            f"the output {given!r} is the source store itself; choose a new path "
            "(convert never rewrites its source)"
        )
    for inner, outer, what in ((out, source, "inside"), (source, out, "around")):
        if inner.startswith(outer.rstrip("/") + "/"):
            raise ConfigError(
                f"the output {given!r} lies {what} the source store {source}; choose a "
                "path outside it"
            )


def _chosen_samples(
    indices: Sequence[int] | np.ndarray | None,
    reader: StoreReader,
    sequences: SequenceReader | None,
) -> np.ndarray | None:
    """``indices`` as sorted int64 sample (sequence) indices of ``reader``, refusing anything
    else."""
    if indices is None:
        return None
    values = np.asarray(indices)
    n, unit = (
        (reader.num_samples, "samples")
        if sequences is None
        else (sequences.num_sequences, "sequences")
    )
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ConfigError(
            f"indices must be a 1-D sequence of integer sample indices, got a {values.dtype} "
            f"array of shape {values.shape}"
        )
    if not values.size:
        raise ConfigError("indices select no sample; give at least one sample index")
    rows = np.sort(values.astype(np.int64))
    outside = rows[(rows < 0) | (rows >= n)]
    if outside.size:
        raise ConfigError(
            f"indices hold {counted(outside.size, 'value')} outside [0, {n}) (e.g. "
            f"{outside[0]}); {reader.where} holds {n} {unit}"
        )
    repeated = rows[1:][rows[1:] == rows[:-1]]
    if repeated.size:
        raise ConfigError(f"indices list sample {repeated[0]} more than once; list each once")
    augment = reader.metadata.augment or {}
    if "partner" in (augment.get("fields") or []):
        raise ConfigError(
            f"{reader.where} holds mixed views (recipe {augment.get('recipe')!r}) "
            "whose partners are other samples by index; a subset would break them: convert the "
            "whole store, or dump the subset again"
        )
    return rows


def _copy_rows(
    reader: StoreReader,
    samples: np.ndarray,
    source_starts: np.ndarray,
    new_starts: np.ndarray,
    write: Any,
) -> None:
    """Decode the source one chunk at a time and write the rows of ``samples`` (ascending) to
    their new places. Sample ``samples[i]`` owns source rows ``source_starts[s]`` onwards (views,
    or a sequence's tokens) and new rows ``new_starts[i]`` onwards, in the same order."""
    metadata = reader.metadata
    step = metadata.chunk_rows
    names = list(reader.encoding.layout(metadata.num_classes))
    for start in range(0, metadata.num_rows, step):
        stop = min(start + step, metadata.num_rows)
        rows = np.arange(start, stop)
        owners = np.searchsorted(source_starts, rows, side="right") - 1
        positions = np.searchsorted(samples, owners)
        inside = positions < samples.size
        inside[inside] = samples[positions[inside]] == owners[inside]
        if not inside.any():
            continue  # no selected sample here: the chunk is never read
        arrays = {name: reader.read_rows(name, start, stop)[inside] for name in names}
        dense = reader.encoding.decode(arrays, temperature=_SOURCE_DECODE_TEMPERATURE)
        offset = rows[inside] - source_starts[owners[inside]]
        write(new_starts[positions[inside]] + offset, dense)
