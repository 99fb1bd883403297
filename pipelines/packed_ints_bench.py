"""Speed of ``kdcache.packed_ints`` on sparse stores' chunks, beside another version.

    PYTHONPATH=. python pipelines/packed_ints_bench.py [--store STORE ...] \
        [--against <(git show REV:kdcache/store/format/packed_ints.py)]

Chunks: every packed array of each ``--store`` (its first chunk; e.g. a ``sampled:S`` store that
pipelines/lm_stdlib.py dumped from a real teacher), then synthetic ones: ``topk:32`` ids drawn
uniformly below 131,072 (the hardest ids to pack) and descending float16 offsets. Each chunk is
decoded, then encoded, for half a second at a time, alternately by the module file ``--against``
(loaded apart, not registered with zarr) and by this checkout's codec, three rounds; the medians
are printed as a Markdown table in millions of rows per second. Both versions must decode every
chunk to the same values, and both must encode it to the same bytes.

For each ``--store`` a second table times reading its packed arrays' full chunks as a feed does:
through zarr (``array[start:stop]``) and through
:class:`~kdcache.store.read.chunk_files.ChunkFileReader` (the file read, checked and unpacked in
the calling thread, into a reused buffer), alternately, three rounds, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import zarr

from kdcache import open_store
from kdcache.store.format import packed_ints
from kdcache.store.read.chunk_files import ChunkFileReader

ROUND_S = 0.5
ROUNDS = 3


def load_module_file(path: str) -> ModuleType:
    """The module at ``path`` without its zarr/numcodecs registrations (this checkout's stay)."""
    source = Path(path).read_text()
    for registration in (
        "register_codec(CODEC_NAME, PackedIntsCodec)",
        "register_numcodec(PackedInts)",
    ):
        source = source.replace(registration, "")
    module = ModuleType("packed_ints_against")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def store_chunks(path: str) -> dict[str, np.ndarray]:
    reader = open_store(path)
    rows = min(reader.metadata.chunk_rows, reader.metadata.num_rows)
    name = Path(path).name
    return {
        f"{name} {array} ({reader.encoding.name}, V = {reader.num_classes:,})": np.asarray(
            reader.guard.array(array)[:rows]
        )
        for array in reader.encoding.packed_arrays
    }


def synthetic_chunks(rows: int = 20_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    offsets = -np.sort(rng.exponential(2.0, size=(rows, 32)), axis=1)
    return {
        "topk:32 ids, uniform below 131,072": rng.integers(0, 131_072, size=(rows, 32)).astype(
            np.uint32
        ),
        "topk:32 float16 offsets": offsets.astype(np.float16),
    }


def rows_per_second(call: Callable[[], object], rows: int) -> float:
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < ROUND_S:
        call()
        count += 1
    return rows * count / (time.perf_counter() - started)


def median_rates(
    modules: list[ModuleType], values: np.ndarray, data: bytes
) -> list[tuple[float, float]]:
    """Per module, the median (decode, encode) rows/s of ``data``/``values`` over the rounds,
    the modules taking turns."""
    rates: list[list[tuple[float, float]]] = [[] for _ in modules]
    for _ in range(ROUNDS):
        for taken, module in zip(rates, modules, strict=True):
            decode = rows_per_second(partial(module.unpack_rows, data), len(values))
            encode = rows_per_second(partial(module.pack_rows, values), len(values))
            taken.append((decode, encode))
    return [
        (statistics.median(r[0] for r in taken), statistics.median(r[1] for r in taken))
        for taken in rates
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", default=[], help="a sparse store")
    parser.add_argument("--against", help="another version of packed_ints.py to time beside")
    args = parser.parse_args()
    against = load_module_file(args.against) if args.against else None
    chunks = {}
    for path in args.store:
        chunks.update(store_chunks(path))
    chunks.update(synthetic_chunks())
    if against is None:
        print("| chunk | rows x K | B/row | decode M rows/s | encode M rows/s |")
        print("|---|---|---|---|---|")
    else:
        print(
            "| chunk | rows x K | B/row | decode M rows/s (against, this) | "
            "encode M rows/s (against, this) |"
        )
        print("|---|---|---|---|---|")
    for label, values in chunks.items():
        data = packed_ints.pack_rows(values)
        assert packed_ints.unpack_rows(data).tobytes() == values.tobytes(), label
        modules = [packed_ints]
        if against is not None:
            assert against.pack_rows(values) == data, f"{label}: the versions encode differently"
            assert against.unpack_rows(data).tobytes() == values.tobytes(), label
            modules = [against, packed_ints]
        rates = median_rates(modules, values, data)
        size = f"{len(values):,} x {values.shape[1]} | {len(data) / len(values):.1f}"
        if against is None:
            ((decode, encode),) = rates
            print(f"| {label} | {size} | {decode / 1e6:.2f} | {encode / 1e6:.2f} |")
        else:
            (old_decode, old_encode), (decode, encode) = rates
            print(
                f"| {label} | {size} | {old_decode / 1e6:.2f} → {decode / 1e6:.2f} "
                f"({decode / old_decode:.1f}x) | {old_encode / 1e6:.2f} → {encode / 1e6:.2f} "
                f"({encode / old_encode:.1f}x) |"
            )
    if args.store:
        print("\n| array | chunks x rows | M rows/s through zarr | M rows/s chunk files | ratio |")
        print("|---|---|---|---|---|")
        for path in args.store:
            for label, zarr_rate, file_rate, full_chunks, rows in chunk_read_rates(path):
                print(
                    f"| {label} | {full_chunks} x {rows:,} | {zarr_rate / 1e6:.2f} | "
                    f"{file_rate / 1e6:.2f} | {file_rate / zarr_rate:.1f}x |"
                )
    sys.stdout.flush()


def read_full_chunks(array: zarr.Array, files: ChunkFileReader | None, out: np.ndarray) -> None:
    """Every full chunk of ``array`` into ``out`` (one chunk's rows), through ``files`` or
    (None) zarr."""
    rows = len(out)
    for chunk in range(array.shape[0] // rows):
        if files is None:
            out[...] = array[chunk * rows : (chunk + 1) * rows]
        else:
            assert files.decode_into(chunk, out)


def chunk_read_rates(path: str) -> list[tuple[str, float, float, int, int]]:
    """Per packed array of the store at ``path``: rows/s reading its full chunks through zarr and
    through chunk files, and how many chunks of how many rows."""
    reader = open_store(path)
    rows = reader.metadata.chunk_rows
    results = []
    for name in reader.encoding.packed_arrays:
        array = reader.guard.array(name)
        full_chunks = array.shape[0] // rows
        if full_chunks == 0:
            continue
        files = ChunkFileReader.for_array(array)
        assert files is not None, f"{name}: no chunk-file path for this array"
        out = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
        rates: dict[str, list[float]] = {"zarr": [], "files": []}
        for _ in range(ROUNDS):
            for way, source in (("zarr", None), ("files", files)):
                read = partial(read_full_chunks, array, source, out)
                rates[way].append(rows_per_second(read, full_chunks * rows))
        results.append(
            (
                f"{Path(path).name} {name}",
                statistics.median(rates["zarr"]),
                statistics.median(rates["files"]),
                full_chunks,
                rows,
            )
        )
    return results


if __name__ == "__main__":
    main()
