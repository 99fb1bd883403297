"""Merge the stores of several teachers over one dataset into one store of their ensemble.

The sources must hold the same rows: one dataset (record and fingerprint), the same samples and
labels, the same views (V, recipe, every view's parameters) and, for token stores, the same
sequences. Row by row the ensemble's logits are :func:`~kdcache.logits.ensemble.combine_logits`
of the sources' rows (``mean`` of logits, or the probability-space ``mixture`` at a temperature),
the very arithmetic multi-teacher distillation uses, so a float32 merge equals the multi-store
run bit for bit. Dense sources merge exactly. A sparse (``topk:K``) source enters with its tail
filled for the temperature: its distribution there is its top-K plus its exact tail mass spread
uniformly, so the sources' mixture is the union of their kept classes plus one uniform tail,
which a ``topk:K'`` output holds exactly when K' covers the union (K' defaults to the sum of the
sources' K); a ``topk:K':BITS`` output (``bits``) holds it to its codes' bounded error in about a
fifth fewer bytes. A ``sampled:S`` source holds draws at T = 1: it merges in ``mixture``
mode at T = 1.

The sources are read one row chunk at a time (each chunk checked by the reader's guard) and the
rows written through :func:`~kdcache.store.write.writer.create_store`, as ``kdcache convert``
does: nothing is held whole, every writer guarantee holds, and the new store verifies before it
is complete. ``extra["ensemble"]`` records the mode, temperature, weights and every source (its
location, generation, content and record digests, encoding and teacher).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.encodings import SampledEncoding, TopKEncoding, parse_encoding
from kdcache.logits.ensemble import (
    ENSEMBLE_KEY,
    MEAN,
    MIXTURE,
    check_mode,
    combine_logits,
    ensemble_weights,
    mixture_temperature,
)
from kdcache.logits.fidelity import Fidelity
from kdcache.logits.loss_options import check_temperature
from kdcache.logits.viewset import MAX_BITS, MIN_BITS
from kdcache.store.format.layout import FIRST_TOKEN_ARRAY, OFFSETS_ARRAY, SEQUENCE_KEY, StoreLike
from kdcache.store.format.location import parse_location
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import SequenceReader
from kdcache.store.tools.verified_write import write_verified_store

if TYPE_CHECKING:
    from kdcache.store.write.writer import StoreWriter

__all__ = [
    "MergeResult",
    "check_same_rows",
    "merge_stores",
    "warn_mixture_temperature",
]

log = logging.getLogger("kdcache")

#: Dense encodings from the most to the least precise: the default output of dense sources.
_DENSE_BY_PRECISION = ("float32", "float16", "int8")


@dataclass(frozen=True)
class MergeResult:
    """The new store: where, its size, how it was merged, its encoding and measured fidelity."""

    out: str
    sources: tuple[str, ...]
    #: Samples of the new store (sequences in a token store).
    num_samples: int
    views: int
    mode: str
    temperature: float
    weights: tuple[float, ...]
    encoding: str
    fidelity: Fidelity | None
    nbytes: int | None
    #: Bytes on disk of each source (None for a remote one).
    source_nbytes: tuple[int | None, ...]


def merge_stores(
    sources: Sequence[StoreLike],
    out: StoreLike,
    *,
    mode: str = MEAN,
    temperature: float = 1.0,
    weights: Sequence[float] | None = None,
    encoding: str | None = None,
    top_k: int | None = None,
    bits: int | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> MergeResult:
    """Write the ensemble of the complete stores ``sources`` (two or more) into a new store ``out``.

    ``mode`` is ``mean`` (weighted mean of the logits) or ``mixture`` (the mixture of the softmaxes
    at ``temperature``, stored as ``T * log(mixture)``: distill it at that T). ``weights`` (one
    per source, >= 0; default equal) are normalised to sum to 1. ``encoding`` defaults to the most
    precise of dense sources' encodings, or ``topk:K`` when a source is sparse, K being ``top_k``
    (default: the sum of the sparse sources' K and S, at most C - 1, which holds their union);
    ``bits`` makes that output ``topk:K:BITS``, its values in BITS-bit codes.
    """
    check_mode(mode)
    check_temperature(temperature)
    if len(sources) < 2:
        raise ConfigError(
            f"merge needs two or more stores, got {len(sources)}; list every teacher's store"
        )
    out_location = parse_location(out)
    out_target = out_location.resolved().target
    locations = [parse_location(source) for source in sources]
    for location in locations:
        _refuse_overlap(location.resolved().target, out_target, out_location.text)
    readers = [open_store(source) for source in sources]  # refuses unfinished or damaged stores
    normalised = ensemble_weights(weights, len(readers))
    first = readers[0]
    for other in readers[1:]:
        check_same_rows(first, other)
    _check_modes(readers, mode, temperature)
    codec = parse_encoding(
        _output_encoding(readers, encoding, top_k, bits), num_classes=first.num_classes
    )
    codec.layout(first.num_classes)  # a topk:K too wide for the classes is refused here
    metadata = first.metadata
    sequences = isinstance(metadata.extra.get(SEQUENCE_KEY), dict)
    arrays: dict[str, np.ndarray] | None = None
    extra: dict[str, Any] = {}
    if sequences:
        layout = SequenceReader(first)
        arrays = {OFFSETS_ARRAY: layout.offsets, FIRST_TOKEN_ARRAY: layout.first_token}
        extra[SEQUENCE_KEY] = metadata.extra[SEQUENCE_KEY]
    sparse = any(reader.encoding.is_sparse for reader in readers)
    extra[ENSEMBLE_KEY] = {
        "mode": mode,
        "temperature": temperature if mode == MIXTURE else None,
        "tail_fill_temperature": temperature if sparse else None,
        "weights": list(normalised),
        "sources": [
            _describe_source(reader, location)
            for reader, location in zip(readers, locations, strict=True)
        ],
        "fidelity_against": "the ensemble of the sources' rows"
        + (f" (sparse tails filled at T={temperature:g})" if sparse else ""),
    }

    def fill(writer: StoreWriter) -> None:
        step = writer.metadata.chunk_rows
        cursors = [_RowCursor(reader) for reader in readers]
        for start in range(0, metadata.num_rows, step):
            stop = min(start + step, metadata.num_rows)
            members = [cursor.rows(start, stop, temperature) for cursor in cursors]
            merged = combine_logits(members, weights=normalised, mode=mode, temperature=temperature)
            writer.write(np.arange(start, stop), merged.numpy())

    written = write_verified_store(
        out,
        fill,
        num_samples=metadata.num_samples,
        num_classes=metadata.num_classes,
        encoding=codec.name,
        labels=first.labels,
        chunk_rows=chunk_rows,
        teacher=_ensemble_teacher(readers, mode),
        dataset=metadata.dataset,
        extra=extra,
        overwrite=overwrite,
        views=metadata.views,
        augment=metadata.augment,
        view_params=first.view_params,
        fsync=fsync,
        arrays=arrays,
    )
    return MergeResult(
        out=out_location.text,
        sources=tuple(location.text for location in locations),
        num_samples=SequenceReader(first).num_sequences if sequences else metadata.num_samples,
        views=metadata.views,
        mode=mode,
        temperature=temperature,
        weights=normalised,
        encoding=codec.name,
        fidelity=None if written.fidelity is None else Fidelity.from_dict(written.fidelity),
        nbytes=out_location.nbytes(),
        source_nbytes=tuple(location.nbytes() for location in locations),
    )


class _RowCursor:
    """Rows of one source, read a whole-chunk range at a time as the merge walks forward (the
    sources' chunk sizes may differ): each chunk is decoded once or, at a boundary, twice."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self.names = list(reader.encoding.layout(reader.num_classes))
        self.start = self.stop = 0
        self.arrays: dict[str, np.ndarray] = {}

    def rows(self, start: int, stop: int, temperature: float) -> Any:
        """Rows ``start:stop`` in the form the ensemble takes: sparse, or dense float32."""
        if not (self.start <= start and stop <= self.stop):
            step = self.reader.metadata.chunk_rows
            self.start = start // step * step
            self.stop = min(-(-stop // step) * step, self.reader.num_rows)
            self.arrays = {
                name: self.reader.read_rows(name, self.start, self.stop) for name in self.names
            }
        wanted = {
            name: values[start - self.start : stop - self.start]
            for name, values in self.arrays.items()
        }
        sparse = self.reader.encoding.sparse(wanted)
        if sparse is not None:
            return sparse
        return torch.from_numpy(self.reader.encoding.decode(wanted, temperature=temperature))


def _refuse_overlap(source: str, out: str, given: str) -> None:
    """Refuse an output that is a source, lies inside one, or holds one."""
    if source == out:
        raise ConfigError(
            f"the output {given!r} is one of the stores to merge; choose a new path (merge "
            "never rewrites its sources)"
        )
    for inner, outer, what in ((out, source, "inside"), (source, out, "around")):
        if inner.startswith(outer.rstrip("/") + "/"):
            raise ConfigError(
                f"the output {given!r} lies {what} the store {source} to merge; choose a path "
                "outside it"
            )


def check_same_rows(first: StoreReader, other: StoreReader, *, action: str = "merge") -> None:
    """Refuse, naming the first difference, a store whose rows are not ``first``'s rows: other
    classes, samples, views, dataset record, labels, view parameters or sequences."""
    a, b = first.metadata, other.metadata
    checks: list[tuple[str, Any, Any]] = [
        ("classes", a.num_classes, b.num_classes),
        ("rows (samples, or tokens of a token store)", a.num_samples, b.num_samples),
        ("views per sample", a.views, b.views),
        ("dataset record", a.dataset, b.dataset),
        ("augmentation record", a.augment, b.augment),
        ("sequence layout", a.extra.get(SEQUENCE_KEY), b.extra.get(SEQUENCE_KEY)),
    ]
    for what, mine, theirs in checks:
        if mine != theirs:
            raise StoreMismatchError(
                f"{other.where} differs from {first.where} in its {what} ({theirs!r} vs "
                f"{mine!r}); {action} only stores of one dataset (same samples, labels and views)"
            )
    arrays: list[tuple[str, Any, Any]] = [
        ("labels", lambda: first.labels, lambda: other.labels),
        ("view parameters", lambda: first.view_params, lambda: other.view_params),
    ]
    if isinstance(a.extra.get(SEQUENCE_KEY), dict):
        arrays += [
            (
                "sequence offsets",
                lambda: SequenceReader(first).offsets,
                lambda: SequenceReader(other).offsets,
            ),
            (
                "first tokens",
                lambda: SequenceReader(first).first_token,
                lambda: SequenceReader(other).first_token,
            ),
        ]
    for what, mine, theirs in arrays:
        left, right = mine(), theirs()
        if (left is None) != (right is None) or (
            left is not None and not np.array_equal(left, right)
        ):
            raise StoreMismatchError(
                f"{other.where} differs from {first.where} in its {what}; {action} only stores "
                "of one dataset (same samples, labels and views)"
            )


def warn_mixture_temperature(reader: StoreReader, temperature: float) -> None:
    """Warn, in one line, when a store of a ``mixture`` is softened at another temperature than
    the one it was mixed at (its softmax there is not the mixture)."""
    mixed_at = mixture_temperature(reader.metadata.extra)
    if mixed_at is not None and mixed_at != temperature:
        log.warning(
            "%s holds a mixture of teachers at T=%g but is softened at T=%g, where it is no "
            "mixture; distill it at --temperature %g, or merge again at T=%g",
            reader.where,
            mixed_at,
            temperature,
            mixed_at,
            temperature,
        )


def _check_modes(readers: Sequence[StoreReader], mode: str, temperature: float) -> None:
    for reader in readers:
        if isinstance(reader.encoding, SampledEncoding):
            if mode == MEAN:
                raise ConfigError(
                    f"{reader.where} is a {reader.metadata.encoding} store, whose rows are draws "
                    "at T = 1, not logits: merge it with --mode mixture --temperature 1"
                )
            reader.encoding.check_distill_temperature(temperature)


def _output_encoding(
    readers: Sequence[StoreReader], encoding: str | None, top_k: int | None, bits: int | None
) -> str:
    if encoding is not None and (top_k is not None or bits is not None):
        given = f"--top-k {top_k}" if top_k is not None else f"--bits {bits}"
        raise ConfigError(
            f"{given} and --encoding {encoding} both choose the output encoding; give one "
            f"(--top-k K --bits BITS means --encoding topk:K:BITS)"
        )
    if bits is not None and not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(
            f"--bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}; e.g. --bits 8"
        )
    suffix = "" if bits is None else f":{bits}"
    if encoding is not None:
        return encoding
    if top_k is not None:
        return f"topk:{top_k}{suffix}"
    kept = [_kept_classes(reader) for reader in readers]
    if any(count is not None for count in kept):
        union = sum(
            count or reader.num_classes for count, reader in zip(kept, readers, strict=True)
        )
        return f"topk:{min(union, readers[0].num_classes - 1)}{suffix}"
    if bits is not None:
        raise ConfigError(
            f"--bits {bits} codes the values of a topk:K output, but the sources are dense and "
            "the output too; add --top-k K for a topk:K:BITS output, or drop --bits"
        )
    names = {reader.metadata.encoding for reader in readers}
    return next(name for name in _DENSE_BY_PRECISION if name in names)


def _kept_classes(reader: StoreReader) -> int | None:
    """The classes a sparse store keeps per row (K, or S draws); None for a dense store."""
    if isinstance(reader.encoding, TopKEncoding):
        return reader.encoding.k
    if isinstance(reader.encoding, SampledEncoding):
        return reader.encoding.num_draws
    return None


def _describe_source(reader: StoreReader, location: Any) -> dict[str, Any]:
    metadata = reader.metadata
    return {
        "store": location.resolved().target,
        "generation": metadata.generation,
        "content_sha256": reader.content_digest(),
        "record_digest": (metadata.digests or {}).get("record"),
        "encoding": metadata.encoding,
        "teacher": metadata.teacher,
    }


def _ensemble_teacher(readers: Sequence[StoreReader], mode: str) -> dict[str, Any]:
    specs = [str((reader.metadata.teacher or {}).get("spec")) for reader in readers]
    return {"spec": f"ensemble:{mode}({', '.join(specs)})", "weights_sha256": None}
