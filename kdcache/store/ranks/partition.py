"""Who writes what in a dump by K processes: units of whole chunks, and the teacher's batches.

Concurrent writes to parts of one Zarr chunk lose rows, so the store's row chunks are grouped
into *units* of whole consecutive chunks and rank r of K owns units r, r+K, r+2K, ... The
teacher's batches are the grid ``[0, B)``, ``[B, 2B)``, ... cut at unit boundaries, so a batch
never spans two owners. The batches depend on N, the chunk size and the batch size only, never
on K: every row is computed in the same batch whatever the number of ranks or resumes, and on
CPU (where a row's logits depend on its batch's composition in the last bits) the store is
bit-identical however it was written. Plain functions of numbers, used by kdcache.distributed;
a sequence store's rows are tokens, whose samples straddle chunks: :func:`sequence_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_UNITS",
    "SequencePlan",
    "dump_batches",
    "owned_chunks",
    "sequence_plan",
    "unit_chunks",
]

#: A unit of the dump plan holds whole chunks worth at least this many teacher batches, so the
#: short batch at a unit's end costs little...
_UNIT_BATCHES = 8
#: ...unless the store has fewer than this many units of that size: then smaller units (down to
#: one chunk) keep up to this many ranks busy.
MIN_UNITS = 64


def unit_chunks(*, num_chunks: int, chunk_rows: int, batch_size: int) -> int:
    """Chunks per unit (see the module docstring); independent of the number of ranks."""
    enough = -(-_UNIT_BATCHES * batch_size // chunk_rows)
    return max(1, min(enough, num_chunks // MIN_UNITS))


def owned_chunks(num_chunks: int, *, per_unit: int, rank: int, world_size: int) -> np.ndarray:
    """The chunks rank ``rank`` writes: those of units ``rank``, ``rank + K``, ..."""
    chunks = np.arange(num_chunks)
    return chunks[(chunks // per_unit) % world_size == rank]


def dump_batches(
    pending: np.ndarray,
    *,
    num_samples: int,
    chunk_rows: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """The teacher batches rank ``rank`` runs to fill its still pending chunks.

    Batches are the grid ``[0, B)``, ``[B, 2B)``, ... cut at unit boundaries; those holding a
    pending row of one of this rank's chunks are kept. An uninterrupted one-process dump runs
    the same batches (all ranks' together), so each row always comes from the same batch.
    """
    num_chunks = -(-num_samples // chunk_rows)
    per_unit = unit_chunks(num_chunks=num_chunks, chunk_rows=chunk_rows, batch_size=batch_size)
    unit_rows = per_unit * chunk_rows
    mine = np.zeros(num_chunks, dtype=bool)
    mine[owned_chunks(num_chunks, per_unit=per_unit, rank=rank, world_size=world_size)] = True
    rows = np.asarray(pending, dtype=np.int64)
    rows = rows[mine[rows // chunk_rows]]
    # A batch is identified by (its unit, its grid cell); both start points are multiples.
    starts = np.unique(np.maximum(rows // batch_size * batch_size, rows // unit_rows * unit_rows))
    batches = []
    for start in starts.tolist():
        stop = min((start // batch_size + 1) * batch_size, (start // unit_rows + 1) * unit_rows)
        batches.append(list(range(start, min(stop, num_samples))))
    return batches


@dataclass(frozen=True)
class SequencePlan:
    """Rank ``rank``'s share of a sequence store's dump (kdcache.store.sequence).

    A sample's token rows may straddle chunks, and so units, so the batches are the grid of
    samples ``[0, B)``, ``[B, 2B)``, ... uncut: every rank owning a pending row of a batch runs
    it (a batch on a unit boundary runs on both ranks, in the same composition, so with the same
    logits) and writes only the rows of its own units, one write per unit of the batch
    (:meth:`blocks`). The blocks a row is written in, which seed a ``sampled:S`` encoding's
    draws, are then the same for any number of ranks, as the batches are.
    """

    batches: list[list[int]]
    unit_rows: int
    rank: int = 0
    world_size: int = 1

    def blocks(self, rows: np.ndarray) -> list[np.ndarray]:
        """Positions in ``rows`` (one batch's token rows) of each unit this rank owns."""
        units = np.asarray(rows) // self.unit_rows
        return [
            np.flatnonzero(units == unit)
            for unit in np.unique(units).tolist()
            if unit % self.world_size == self.rank
        ]


def sequence_plan(
    pending: np.ndarray,
    *,
    offsets: np.ndarray,
    chunk_rows: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> SequencePlan:
    """The :class:`SequencePlan` of rank ``rank``: the batches of samples holding a pending token
    row of its chunks. ``offsets`` (N + 1,) gives sample i the rows ``offsets[i]:offsets[i + 1]``.

    Units hold at least one batch's worth of rows (a mean batch: B samples' share of the rows),
    so a batch of typical length spans at most two units and runs on at most two ranks.
    """
    num_rows, num_sequences = int(offsets[-1]), len(offsets) - 1
    num_chunks = -(-num_rows // chunk_rows)
    batch_rows = max(1, -(-batch_size * num_rows // num_sequences))
    per_unit = max(
        -(-batch_rows // chunk_rows),
        unit_chunks(num_chunks=num_chunks, chunk_rows=chunk_rows, batch_size=batch_rows),
    )
    mine = np.zeros(num_chunks, dtype=bool)
    mine[owned_chunks(num_chunks, per_unit=per_unit, rank=rank, world_size=world_size)] = True
    rows = np.asarray(pending, dtype=np.int64)
    rows = rows[mine[rows // chunk_rows]]
    samples = np.searchsorted(offsets, rows, side="right") - 1
    starts = np.unique(samples // batch_size) * batch_size
    batches = [
        list(range(start, min(start + batch_size, num_sequences))) for start in starts.tolist()
    ]
    return SequencePlan(batches, per_unit * chunk_rows, rank, world_size)
