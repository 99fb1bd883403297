"""Digests that bind every array of a store, and its metadata record, to what was written.

zarr's crc32c proves that a chunk's bytes are intact, not that they sit at the right place or
belong to this store: a chunk file copied over another chunk of the same array, swapped with it,
replaced by a link to it, or taken from another store still decodes. kdcache therefore records:

* **Row chunks** (the encoding's arrays, written chunk by chunk): before the chunk's
  ``chunk_written`` flag, a digest of the chunk's *decoded* values together with its chunk
  index, its array name and dtype and the store's binding (its generation id and, in stores
  that have one, the record digest below), in the ``chunk_digests`` array (one row per chunk,
  one 16-byte digest per encoded array).
* **Whole arrays** (every other array the store holds: ``labels``, ``view_params``,
  ``offsets``, ``first_token`` and any later one, each written once when the store is
  created): one digest of the array's decoded values, name, dtype and shape, in the record's
  ``digests.whole``. It depends on the values only, so two dumps of the same data record the
  same digest.
* **The record**: a digest of the canonical metadata record (every field except the ones
  that change while a store is written or name its instance: ``complete``, ``fidelity``,
  ``generation``, ``created_at``), in ``digests.record``. An edited recipe, seed, sampler,
  input size or sequence layout no longer matches it; and because every row chunk's digest
  is bound to it, stripping the newer fields makes every chunk fail instead of downgrading the
  store to an unverified older format.

A reader recomputes these whenever it decodes. They guard against accidents and mix-ups, not
against someone who rewrites the digests too: sign or pin the store's bytes elsewhere for that
(see docs/sharing.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "ALGORITHM",
    "DIGESTS_ARRAY",
    "DIGEST_BYTES",
    "chunk_binding",
    "chunk_digest",
    "chunk_digests",
    "record_digest",
    "values_digest",
    "whole_digest",
]

DIGESTS_ARRAY = "chunk_digests"
ALGORITHM = "sha256-128"
DIGEST_BYTES = 16
#: Record fields left out of the record digest: they change while the store is written
#: (``complete``, ``fidelity``) or name this instance of it (``generation``, ``created_at``).
_UNBOUND_FIELDS = ("complete", "fidelity", "generation", "created_at")


def _canonical(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))


def chunk_digest(binding: str, name: str, chunk: int, values: np.ndarray) -> np.ndarray:
    """The 16-byte digest (uint8) of row chunk ``chunk`` of array ``name`` holding ``values``;
    ``binding`` is the store's :func:`chunk_binding`."""
    canonical = _canonical(values)
    digest = hashlib.sha256()
    header = f"kdcache-chunk:{binding}:{name}:{chunk}:{canonical.dtype.str}:{canonical.shape}"
    digest.update(header.encode())
    digest.update(canonical.tobytes())
    return np.frombuffer(digest.digest()[:DIGEST_BYTES], dtype=np.uint8)


def chunk_digests(
    binding: str, names: list[str], chunk: int, arrays: dict[str, np.ndarray]
) -> np.ndarray:
    """One digest per array of ``names``, ``(len(names), 16)`` uint8, for one row chunk."""
    return np.stack([chunk_digest(binding, name, chunk, arrays[name]) for name in names])


def chunk_binding(generation: str, digests: dict[str, Any] | None) -> str:
    """What every row chunk's digest is bound to: the generation id, and the record digest in
    stores that record one (older stores: the generation alone)."""
    record = (digests or {}).get("record")
    return generation if record is None else f"{generation}:{record}"


def whole_digest(
    name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]
) -> str:
    """Hex digest of a whole array ``name`` read as consecutive ``blocks`` along its first axis
    (one block holding every value gives the same digest as many)."""
    canonical_dtype = np.dtype(dtype).newbyteorder("<")
    digest = hashlib.sha256(f"kdcache-array:{name}:{canonical_dtype.str}:{tuple(shape)}".encode())
    for block in blocks:
        digest.update(_canonical(np.asarray(block, dtype=dtype)).tobytes())
    return digest.hexdigest()[: 2 * DIGEST_BYTES]


def values_digest(name: str, values: np.ndarray) -> str:
    """:func:`whole_digest` of an array held in memory."""
    return whole_digest(name, values.shape, values.dtype, [values])


def record_digest(record: dict[str, Any]) -> str:
    """Hex digest of a metadata record's bound fields (all but :data:`_UNBOUND_FIELDS` and the
    record digest itself), as canonical JSON."""
    bound = {key: value for key, value in record.items() if key not in _UNBOUND_FIELDS}
    bound["digests"] = {k: v for k, v in (bound.get("digests") or {}).items() if k != "record"}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"kdcache-record:{text}".encode()).hexdigest()[: 2 * DIGEST_BYTES]
