"""Decode speed of ``kdcache.packed_ints`` on sparse stores' chunks, beside another version.

    PYTHONPATH=. python pipelines/packed_ints_bench.py [--store STORE ...] \
        [--against <(git show REV:kdcache/store/format/packed_ints.py)]

Chunks: every packed array of each ``--store`` (its first chunk; e.g. a ``sampled:S`` store that
pipelines/lm_stdlib.py dumped from a real teacher), then synthetic ones: ``topk:32`` ids drawn
uniformly below 131,072 (the hardest ids to pack) and descending float16 offsets. Each chunk is
decoded for half a second at a time, alternately by this checkout's codec and by the module file
``--against`` (loaded apart, not registered with zarr), three rounds; the medians are printed as
a Markdown table in millions of rows per second. Both versions must decode every chunk to the same
bytes, and both must encode it to the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from kdcache import open_store
from kdcache.logits.encodings import parse_encoding
from kdcache.store.format import packed_ints

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
    store = getattr(reader, "store", reader)
    encoding = parse_encoding(store.metadata.encoding, num_classes=store.metadata.num_classes)
    rows = min(store.metadata.chunk_rows, store.metadata.num_rows)
    name = Path(path).name
    return {
        f"{name} {array} ({encoding.name}, V = {store.metadata.num_classes:,})": np.asarray(
            store.guard.array(array)[:rows]
        )
        for array in encoding.packed_arrays
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


def rows_per_second(module: ModuleType, data: bytes, rows: int) -> float:
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < ROUND_S:
        module.unpack_rows(data)
        count += 1
    return rows * count / (time.perf_counter() - started)


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
    print(
        "| chunk | rows x K | B/row | M rows/s"
        + (" (against) | M rows/s (this) | ratio |" if against else " |")
    )
    print("|---|---|---|---" + ("|---|---|" if against else "|"))
    for label, values in chunks.items():
        data = packed_ints.pack_rows(values)
        assert packed_ints.unpack_rows(data).tobytes() == values.tobytes(), label
        if against is not None:
            assert against.pack_rows(values) == data, f"{label}: the versions encode differently"
            assert against.unpack_rows(data).tobytes() == values.tobytes(), label
        ours, theirs = [], []
        for _ in range(ROUNDS):
            if against is not None:
                theirs.append(rows_per_second(against, data, len(values)))
            ours.append(rows_per_second(packed_ints, data, len(values)))
        size = f"{len(values):,} x {values.shape[1]} | {len(data) / len(values):.1f}"
        this = statistics.median(ours) / 1e6
        if against is None:
            print(f"| {label} | {size} | {this:.2f} |")
        else:
            other = statistics.median(theirs) / 1e6
            print(f"| {label} | {size} | {other:.2f} | {this:.2f} | {this / other:.1f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
