"""Turn a store written now into one as the previous kdcache release wrote it, to test that such
stores still load, verify, resume and distill.

That release recorded chunk digests bound to the generation alone and no ``digests.whole`` or
``digests.record``; the chunk digests are recomputed that way, so the result is exactly what the
previous release would have written (not a store whose integrity data was stripped, which is
refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from narrowing import kdcache_record, stored, zarr_array
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache.store.format.digests import DIGESTS_ARRAY, chunk_digests
from kdcache.store.format.pinning import array_spec


def as_previous_release(path: Path, **record_changes) -> None:
    """Rewrite the store at ``path`` in the previous release's format, with ``record_changes``
    applied to its record (as that release would have recorded them)."""
    group = zarr.open_group(str(path), mode="r+")
    record = {**kdcache_record(group), **record_changes}
    digests = dict(record["digests"])
    digests.pop("whole")
    digests.pop("record")
    record["digests"] = digests
    names, rows = digests["arrays"], record["chunk_rows"]
    num_rows = record["num_samples"] * record.get("views", 1)
    table = zarr_array(group, DIGESTS_ARRAY)
    written = stored(group, "chunk_written")
    for chunk in map(int, np.flatnonzero(written)):
        start, stop = chunk * rows, min((chunk + 1) * rows, num_rows)
        values = {name: np.asarray(zarr_array(group, name)[start:stop]) for name in names}
        table[chunk] = chunk_digests(record["generation"], names, chunk, values)
    group.attrs["kdcache"] = record


def with_plain_arrays(path: Path) -> None:
    """Rewrite the arrays the store codes with kdcache.packed_ints as releases before that codec
    stored them (plain bytes, zstd level 1, crc32c), chunk by written chunk, pinning their new
    zarr metadata in the record; follow with :func:`as_previous_release`."""
    group = zarr.open_group(str(path), mode="r+")
    record = kdcache_record(group)
    rows = record["chunk_rows"]
    num_rows = record["num_samples"] * record.get("views", 1)
    written = np.flatnonzero(stored(group, "chunk_written"))
    for name in record["digests"]["arrays"]:
        old = zarr_array(group, name)
        if array_spec(old)["codecs"][0].get("name") != "kdcache.packed_ints":
            continue
        values = np.asarray(old[:])
        del group[name]
        new = group.create_array(
            name,
            shape=values.shape,
            chunks=old.chunks,
            dtype=values.dtype,
            fill_value=0,
            compressors=[ZstdCodec(level=1), Crc32cCodec()],
        )
        for chunk in map(int, written):
            start, stop = chunk * rows, min((chunk + 1) * rows, num_rows)
            new[start:stop] = values[start:stop]
        record["arrays"] = {**record["arrays"], name: array_spec(new)}
    group.attrs["kdcache"] = record
