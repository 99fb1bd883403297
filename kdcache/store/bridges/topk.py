"""What every import shares: top-k log-probabilities made into dense rows, and the new store
written row batch by row batch, verified, and removed again if anything fails.

Another tool's file keeps a teacher's k largest log-probabilities log p_j (classes j in S, |S| = k)
and nothing of the other C - k classes. The dense row given to the store writer is

    z_j = log p_j  (j in S),    z_i = log( max(1 - sum_{j in S} p_j, MIN_TAIL_MASS) / (C - k) )

so softmax(z) is exactly the stored top-k at T = 1 with the missing mass spread evenly: the
distribution any top-k reader assumes (DistillKit's ``SYMMETRIC_UNIFORM``, FKD's
``marginal_smoothing``). Where that even share would reach the smallest stored probability (few
classes, little stored mass: k = 5 of C = 10 holding 0.5 leaves 0.1 per other class), each other
class gets ``FILL_CAP`` times the smallest stored probability instead, so the stored classes stay
the k largest and a ``topk:k`` store keeps them; softmax(z) then renormalises: the stored
probabilities keep their ratios, scaled up by 1 / (stored mass + (C - k) * fill). Entries that are
padding (a non-finite or sentinel value) count as missing. A ``topk:K`` store then holds those k
values (up to that scale) and its tail statistics describe the even spread; how the true tail was
shaped (and so the tail mass at T != 1) is lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcache.errors import ConfigError, InvalidLogitsError
from kdcache.store.format.layout import (
    FIRST_TOKEN_ARRAY,
    OFFSETS_ARRAY,
    SEQUENCE_KEY,
    StoreLike,
    row_ranges,
)
from kdcache.store.format.location import parse_location
from kdcache.store.sequence import sequence_offsets
from kdcache.store.tools.verified_write import write_verified_store

if TYPE_CHECKING:
    from kdcache.store.write.writer import StoreWriter

__all__ = [
    "FILL_CAP",
    "IMPORTED_FROM_KEY",
    "batched",
    "default_encoding",
    "dense_from_top_k",
    "refuse_existing",
    "required",
    "sequence_record",
    "write_new_store",
]

#: The least total probability left to the classes outside the top-k (a row whose stored
#: probabilities sum to 1 or more, from rounding, still needs finite logits for the others).
_MIN_TAIL_MASS = 1e-6
#: The most an unstored class gets, as a fraction of the row's smallest stored probability: strictly
#: below it, so re-encoding keeps the stored classes (a float16 offset still tells them apart).
FILL_CAP = 0.9
#: Where an imported store's metadata records what it was imported from (``extra``).
IMPORTED_FROM_KEY = "imported_from"
#: Rows decoded and written at a time: a dense row of a 150k vocabulary is 600 kB.
_ROWS_PER_WRITE = 64


def dense_from_top_k(
    log_probs: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    *,
    kept: np.ndarray | None = None,
    where: str = "the source",
) -> np.ndarray:
    """Dense float32 logits (B, C) whose softmax is the top-k ``log_probs`` (B, k) at ``classes``
    (B, k) with the rest of the mass spread evenly, each other class below the smallest stored
    probability (see the module's note). ``kept`` (B, k) marks real entries (default:
    the finite ones); an index outside [0, C) or twice in a row among them is refused."""
    values = np.asarray(log_probs, dtype=np.float64)
    indices = np.asarray(classes, dtype=np.int64)
    real = np.isfinite(values) if kept is None else kept & np.isfinite(values)
    outside = real & ((indices < 0) | (indices >= num_classes))
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise InvalidLogitsError(
            f"{where} names class {int(indices[outside][0])} (row {row}) outside the "
            f"{num_classes} classes; pass the teacher's vocabulary or class count"
        )
    ordered = np.sort(np.where(real, indices, -1 - np.arange(indices.shape[1])), axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(np.flatnonzero(repeated.any(axis=1))[0])
        raise InvalidLogitsError(f"{where} names one class twice in row {row}; it is damaged")
    mass = np.where(real, np.exp(np.where(real, values, 0.0)), 0.0).sum(axis=1)
    counts = real.sum(axis=1)
    if (counts >= num_classes).any():
        raise InvalidLogitsError(
            f"{where} keeps every one of the {num_classes} classes in some rows; import it as a "
            "dense store instead (nothing is missing)"
        )
    smallest = np.where(real, values, np.inf).min(axis=1)
    spread = np.log(np.maximum(1.0 - mass, _MIN_TAIL_MASS) / (num_classes - counts))
    fill = np.minimum(spread, smallest + np.log(FILL_CAP))
    dense = np.repeat(fill[:, None], num_classes, axis=1)
    rows, slots = np.nonzero(real)
    dense[rows, indices[rows, slots]] = values[rows, slots]
    return dense.astype(np.float32)


def sequence_record(sequences: list[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """A token store's labels, ``offsets``/``first_token`` arrays and ``extra.sequence`` for
    ``sequences`` of token ids (kdcache.store.sequence)."""
    lengths = np.array([len(tokens) for tokens in sequences], dtype=np.int64)
    short = np.flatnonzero(lengths < 2)
    if short.size:
        raise InvalidLogitsError(
            f"samples {row_ranges(short)} hold fewer than 2 tokens (no next-token row); a token "
            "store needs at least 2 per sample"
        )
    offsets = sequence_offsets(lengths)
    labels = np.concatenate([np.asarray(tokens, dtype=np.int64)[1:] for tokens in sequences])
    first = np.array([int(tokens[0]) for tokens in sequences], dtype=np.int64)
    layout = {
        "num_sequences": int(lengths.size),
        "num_tokens": int(offsets[-1]),
        "max_length": int(lengths.max()),
    }
    return labels, {OFFSETS_ARRAY: offsets, FIRST_TOKEN_ARRAY: first}, {SEQUENCE_KEY: layout}


def required(value: int | None, option: str, what: str) -> int:
    """``value`` of a command-line ``option`` the import cannot do without (one line if not)."""
    if value is None:
        raise ConfigError(f"{option} is required: {what}")
    return value


def default_encoding(k: int, num_classes: int) -> str:
    """``topk:k``, the encoding that keeps exactly what a top-k file holds (float16 when k
    leaves no class out)."""
    if k < 1:
        raise ConfigError("the source keeps no class per row; nothing to import")
    return f"topk:{k}" if k < num_classes else "float16"


def write_new_store(
    out: StoreLike,
    rows: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    overwrite: bool = False,
    **options: Any,
) -> Any:
    """Write every (row indices, dense logits) batch of ``rows`` into a new store ``out``
    (:func:`~kdcache.store.tools.verified_write.write_verified_store`, which takes the
    :func:`~kdcache.store.write.writer.create_store` ``options``): published only once it
    verifies, nothing half-imported left behind."""

    def fill(writer: StoreWriter) -> None:
        for indices, dense in rows:
            writer.write(indices, dense)

    return write_verified_store(out, fill, overwrite=overwrite, **options)


def refuse_existing(out: StoreLike, overwrite: bool) -> None:
    """Refuse an ``out`` that exists before the source is read at all (unless ``overwrite``)."""
    location = parse_location(out)
    if not overwrite and location.exists():
        raise ConfigError(
            f"{location.text} already exists; choose a new path or pass --overwrite to replace it"
        )


def batched(count: int, size: int = _ROWS_PER_WRITE) -> Iterable[slice]:
    """Consecutive slices of at most ``size`` covering ``range(count)``."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
