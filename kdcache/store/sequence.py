"""Sequence stores: a language model's next-token distributions, one row per token, keyed by sample.

A sequence store is an ordinary kdcache store (:mod:`kdcache.store.write.writer`) whose rows are
tokens
rather than samples, plus two arrays that make sample i's tokens one slice:

- ``offsets`` (N + 1,) int64: sample i owns token rows ``offsets[i]:offsets[i + 1]``;
- ``first_token`` (N,) int64: the first token id of each sample.

Sample i of L_i tokens t_0 .. t_{L_i - 1} has L_i - 1 rows: row ``offsets[i] + j`` holds the
teacher's logits at position j (the distribution of t_{j+1} given t_0 .. t_j), in any encoding, and
``labels`` at that row is t_{j+1}. So the store holds every token id too: sample i is
``[first_token[i], *labels[offsets[i]:offsets[i + 1]]]``. The token rows are chunked like any
store's rows (``chunk_rows`` tokens per chunk), so resume, verify, pack and inspect work unchanged;
the metadata's ``num_samples`` counts token rows and ``extra["sequence"]`` records the layout.

A store may instead hold only the rows of the positions a loss counts (a dump with ``--train-on
assistant``): ``extra["sequence"]["every_position"]`` is then false, sample i's rows are its
counted positions in order, ``labels`` holds their next tokens, and the token ids are not all
in the store (the reader recomputes which positions count from the data it re-tokenizes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, StoreCorruptError, StoreFormatError
from kdcache.logits.encodings import SampledEncoding
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sparse import SparseLogits
from kdcache.store.format.layout import (
    FIRST_TOKEN_ARRAY,
    LABELS_ARRAY,
    OFFSETS_ARRAY,
    SEQUENCE_KEY,
    StoreLike,
    row_ranges,
)
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.write.writer import StoreWriter, create_store

__all__ = [
    "SequenceReader",
    "SequenceWriter",
    "TokenRows",
    "create_sequence_store",
    "is_sequence_store",
    "open_sequence_store",
    "rows_of",
    "sequence_offsets",
    "sequence_problems",
]

#: Teacher rows as read back: dense (n, V), top-k (:class:`SparseLogits`) or draws.
TokenRows = torch.Tensor | SparseLogits | SampledLogits


def sequence_offsets(
    lengths: Sequence[int] | np.ndarray, *, counted: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """``offsets`` (N + 1,) for samples of ``lengths`` tokens: each has max(L - 1, 0) rows, or
    with ``counted`` (per sample, which positions count) as many as it has counted positions."""
    if counted is None:
        rows = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    else:
        rows = np.array([np.count_nonzero(mask) for mask in counted], dtype=np.int64)
    return np.concatenate(([0], np.cumsum(rows))).astype(np.int64)


def rows_of(offsets: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The token rows of ``samples``, concatenated in the order given (each sample's in order)."""
    starts, stops = offsets[samples], offsets[samples + 1]
    counts = stops - starts
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each row's index is its sample's start plus its rank within the sample, without a loop.
    ends = np.cumsum(counts)
    rank = np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    return np.repeat(starts, counts) + rank


def _as_samples(samples: Sequence[int] | np.ndarray | torch.Tensor, count: int) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        samples = samples.cpu().numpy()
    values = np.asarray(samples, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= count):
        raise ConfigError(
            f"sample indices must lie in [0, {count}), got values from {values.min()} to "
            f"{values.max()}"
        )
    return values


class SequenceWriter:
    """Writes the teacher's rows sample by sample; wraps the token-row :class:`StoreWriter`."""

    def __init__(self, writer: StoreWriter, offsets: np.ndarray) -> None:
        self.writer = writer
        self.offsets = offsets

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def pending_samples(self) -> np.ndarray:
        """Samples with a token row whose chunk is not yet durably written, ascending."""
        rows = self.writer.pending_indices()
        owners = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.unique(owners)

    def token_rows(self, samples: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        return rows_of(self.offsets, _as_samples(samples, self.num_sequences))

    def write(
        self, samples: Sequence[int] | np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor
    ) -> None:
        """Store the rows (n, V) of ``samples``: each sample's L - 1 rows in order, concatenated."""
        self.writer.write(self.token_rows(samples), logits)

    def finalize(self, *, verify: Callable[[Path], None] | None = None) -> Any:
        """Mark the store complete; ``verify`` checks a replacement first
        (:meth:`kdcache.store.write.writer.StoreWriter.finalize`)."""
        return self.writer.finalize(verify=verify)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> SequenceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_sequence_store(
    path: StoreLike,
    *,
    sequences: Sequence[np.ndarray],
    vocab_size: int,
    encoding: str = "float16",
    chunk_rows: int | None = None,
    teacher: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    fsync: bool = True,
    counted: Sequence[np.ndarray] | None = None,
) -> SequenceWriter:
    """Create (or resume) a sequence store for the token id arrays ``sequences``.

    Every sample needs at least 2 tokens (one row); ``chunk_rows`` counts tokens per chunk.
    ``counted`` (per sample, L - 1 booleans with at least one set) keeps only the rows of those
    positions. The other options are :func:`kdcache.store.write.writer.create_store`'s.
    """
    lengths = np.array([len(tokens) for tokens in sequences], dtype=np.int64)
    if lengths.size == 0 or (lengths < 2).any():
        short = np.flatnonzero(lengths < 2)[:5].tolist()
        raise ConfigError(
            f"a sequence store needs at least one sample and 2 tokens per sample (one next-token "
            f"row), got {lengths.size} samples, too short: {short}; drop or join short texts"
        )
    following = [np.asarray(tokens, dtype=np.int64)[1:] for tokens in sequences]
    layout: dict[str, Any] = {}
    offsets = sequence_offsets(lengths, counted=counted)
    if counted is not None:
        masks = [np.asarray(mask, dtype=bool) for mask in counted]
        if [len(mask) for mask in masks] != (lengths - 1).tolist() or not all(
            mask.any() for mask in masks
        ):
            raise ConfigError(
                "counted must give each sample one boolean per position with a next token "
                "(L - 1), at least one of them true"
            )
        following = [tokens[mask] for tokens, mask in zip(following, masks, strict=True)]
        layout["every_position"] = False
    labels = np.concatenate(following)
    first = np.array([int(tokens[0]) for tokens in sequences], dtype=np.int64)
    layout = {
        "num_sequences": int(lengths.size),
        "num_tokens": int(offsets[-1]),
        "max_length": int(lengths.max()),
        **layout,
    }
    writer = create_store(
        path,
        num_samples=int(offsets[-1]),
        num_classes=vocab_size,
        encoding=encoding,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=teacher,
        dataset=dataset,
        extra={SEQUENCE_KEY: layout},
        overwrite=overwrite,
        resume=resume,
        fsync=fsync,
        # Written and digested with the store; a resume must give the same ones.
        arrays={OFFSETS_ARRAY: offsets, FIRST_TOKEN_ARRAY: first},
    )
    return SequenceWriter(writer, offsets)


def sequence_problems(
    metadata: StoreMetadata, offsets: np.ndarray, first_token: np.ndarray
) -> list[str]:
    """How a sequence store's ``offsets``, ``first_token`` and sequence record disagree with
    each other and with its token rows (empty when they agree)."""
    layout = metadata.extra.get(SEQUENCE_KEY)
    layout = layout if isinstance(layout, dict) else {}
    problems = []
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0:
        return [
            f"offsets must start at 0 and hold one entry per sample and one more, got "
            f"{offsets[:3].tolist()} ({offsets.size} entries)"
        ]
    steps = np.diff(offsets)
    backwards = np.flatnonzero(steps < 0)
    if backwards.size:
        problems.append(
            f"offsets decrease at samples {row_ranges(backwards)} (each sample's token rows "
            "must follow the previous sample's)"
        )
    if offsets[-1] != metadata.num_samples:
        problems.append(
            f"offsets end at {offsets[-1]} but the store has {metadata.num_samples} token rows"
        )
    expected = {
        "num_sequences": offsets.size - 1,
        "num_tokens": metadata.num_samples,
    }
    for key, value in expected.items():
        if layout.get(key) != value:
            problems.append(f"extra.sequence.{key} is {layout.get(key)!r}, expected {value}")
    longest = int(steps.max()) + 1 if steps.size else 0
    max_length = layout.get("max_length")
    if not isinstance(max_length, int) or max_length < longest:
        problems.append(
            f"extra.sequence.max_length is {max_length!r} but a sample holds {longest} tokens"
        )
    if first_token.shape != (offsets.size - 1,):
        problems.append(f"first_token holds {first_token.size} ids for {offsets.size - 1} samples")
    else:
        outside = np.flatnonzero((first_token < 0) | (first_token >= metadata.num_classes))
        if outside.size:
            problems.append(
                f"first_token lies outside the vocabulary [0, {metadata.num_classes}) for samples "
                f"{row_ranges(outside)}"
            )
    return problems


class SequenceReader:
    """Read-only access to a sequence store: sample i's rows as one slice, ragged batches."""

    def __init__(self, reader: StoreReader) -> None:
        layout = reader.metadata.extra.get(SEQUENCE_KEY)
        if not isinstance(layout, dict):
            raise StoreFormatError(
                f"{reader.where} holds one row per sample, not a sequence store; open it with "
                "kdcache.open_store, or dump a language model with --dataset text:FILE"
            )
        self.store = reader
        self.layout = layout
        self.offsets = reader.guard.whole(OFFSETS_ARRAY).astype(np.int64)
        self.first_token = reader.guard.whole(FIRST_TOKEN_ARRAY).astype(np.int64)
        problems = sequence_problems(reader.metadata, self.offsets, self.first_token)
        if problems:
            raise StoreCorruptError(
                f"{reader.where}: {problems[0]}; the store is damaged: run `kdcache verify` and "
                "dump it again"
            )

    @property
    def where(self) -> str:
        return self.store.where

    @property
    def metadata(self) -> Any:
        return self.store.metadata

    @property
    def num_sequences(self) -> int:
        return len(self.first_token)

    @property
    def num_tokens(self) -> int:
        """Token rows in the store (every token that has a next token)."""
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return self.store.num_classes

    @property
    def every_position(self) -> bool:
        """Whether each sample has a row at every position with a next token (else only at the
        positions its loss counts)."""
        return bool(self.layout.get("every_position", True))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample (rows + 1) of a store with every position."""
        return np.diff(self.offsets) + 1

    def token_rows(self, samples: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        return rows_of(self.offsets, _as_samples(samples, self.num_sequences))

    def tokens(self, sample: int) -> np.ndarray:
        """The token ids of ``sample``, read back from the store alone."""
        if not self.every_position:
            raise StoreFormatError(
                f"{self.where} holds rows only at the positions its loss counts (dumped with "
                "--train-on assistant), so its token ids are not all stored; re-tokenize the "
                "dataset it records, or dump it again with --train-on all"
            )
        start, stop = self.offsets[sample], self.offsets[sample + 1]
        self.store.guard.verify_whole(LABELS_ARRAY)
        labels = self.store.read_rows(LABELS_ARRAY, int(start), int(stop))
        return np.concatenate(([self.first_token[sample]], labels)).astype(np.int64)

    def read(
        self, samples: Sequence[int] | np.ndarray | torch.Tensor, *, temperature: float = 1.0
    ) -> TokenRows:
        """The rows of ``samples`` concatenated, (n, V) or its sparse form, n = sum (L_i - 1).

        Dense encodings give a float32 tensor; ``topk:K`` a :class:`SparseLogits` (``temperature``
        unused); ``sampled:S`` a :class:`SampledLogits`. ``torch.split(range(n), lengths - 1)``
        of the samples recovers each one's slice.
        """
        return self.read_rows(self.token_rows(samples), temperature=temperature)

    def read_rows(self, rows: np.ndarray, *, temperature: float = 1.0) -> TokenRows:
        """Token rows ``rows`` (indices into the store's rows, any order), as :meth:`read`."""
        gathered = self.store.feed.gather(np.asarray(rows, dtype=np.int64))
        encoding = self.store.encoding
        if isinstance(encoding, SampledEncoding):
            return encoding.sampled(gathered)
        sparse = encoding.sparse(gathered)
        if sparse is not None:
            return sparse
        return torch.from_numpy(encoding.decode(gathered, temperature=temperature))


def open_sequence_store(
    path: StoreLike, *, allow_incomplete: bool = False, memory_budget: int | str | None = None
) -> SequenceReader:
    """Open a sequence store read-only (see :func:`kdcache.store.read.reader.open_store`)."""
    return SequenceReader(
        open_store(path, allow_incomplete=allow_incomplete, memory_budget=memory_budget)
    )


def is_sequence_store(path: StoreLike) -> bool:
    """Whether ``path`` holds a complete or partial sequence store (False for any other store)."""
    reader = open_store(path, allow_incomplete=True)
    return isinstance(reader.metadata.extra.get(SEQUENCE_KEY), dict)
