"""A digest per chunk, bound to the chunk's index, its array and the store's generation.

zarr's crc32c proves that a chunk's bytes are intact, not that they sit at the right place: a
chunk file copied over another chunk of the same array, swapped with it, or replaced by a link
to it still decodes. Every writer therefore records, before the chunk's ``chunk_written`` flag,
a digest of the chunk's *decoded* values together with its chunk index, its array name and
dtype and the store's generation id, in the ``chunk_digests`` array (one row per chunk, one
16-byte digest per encoded array). A reader recomputes it whenever it decodes a chunk: a moved
chunk, an edited dtype or codec, or a chunk of another store (after an overwrite) no longer
matches.

The table guards against accidents and mix-ups, not against someone who rewrites the table too:
sign or pin the store's bytes elsewhere for that (see docs/sharing.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

DIGESTS_ARRAY = "chunk_digests"
ALGORITHM = "sha256-128"
DIGEST_BYTES = 16


def chunk_digest(generation: str, name: str, chunk: int, values: np.ndarray) -> np.ndarray:
    """The 16-byte digest (uint8) of row chunk ``chunk`` of array ``name`` holding ``values``."""
    canonical = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    digest = hashlib.sha256()
    header = f"kdcache-chunk:{generation}:{name}:{chunk}:{canonical.dtype.str}:{canonical.shape}"
    digest.update(header.encode())
    digest.update(canonical.tobytes())
    return np.frombuffer(digest.digest()[:DIGEST_BYTES], dtype=np.uint8)


def chunk_digests(
    generation: str, names: list[str], chunk: int, arrays: dict[str, np.ndarray]
) -> np.ndarray:
    """One digest per array of ``names``, ``(len(names), 16)`` uint8, for one row chunk."""
    return np.stack([chunk_digest(generation, name, chunk, arrays[name]) for name in names])
