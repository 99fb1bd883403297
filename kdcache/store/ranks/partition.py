"""Who writes what in a dump by K processes: units of whole chunks, and the teacher's batches.

Concurrent writes to parts of one Zarr chunk lose rows, so the store's row chunks are grouped
into *units* of whole consecutive chunks and rank r of K owns units r, r+K, r+2K, ... The
teacher's batches are the grid ``[0, B)``, ``[B, 2B)``, ... cut at unit boundaries, so a batch
never spans two owners. The batches depend on N, the chunk size and the batch size only, never
on K: every row is computed in the same batch whatever the number of ranks or resumes, and on
CPU (where a row's logits depend on its batch's composition in the last bits) the store is
bit-identical however it was written. Plain functions of numbers, used by kdcache.distributed.
"""

from __future__ import annotations

import numpy as np

#: A unit of the dump plan holds whole chunks worth at least this many teacher batches, so the
#: short batch at a unit's end costs little...
UNIT_BATCHES = 8
#: ...unless the store has fewer than this many units of that size: then smaller units (down to
#: one chunk) keep up to this many ranks busy.
MIN_UNITS = 64


def unit_chunks(*, num_chunks: int, chunk_rows: int, batch_size: int) -> int:
    """Chunks per unit (see the module docstring); independent of the number of ranks."""
    enough = -(-UNIT_BATCHES * batch_size // chunk_rows)
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
