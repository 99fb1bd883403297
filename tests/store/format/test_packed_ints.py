"""kdcache.packed_ints: lossless on every row it is given, small on sparse rows, declared in the
arrays' zarr.json and readable by plain zarr."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import zarr
from narrowing import zarr_array

from kdcache.logits.encodings import parse_encoding
from kdcache.store.format.packed_ints import CODEC_NAME, PackedInts, pack_rows, unpack_rows
from kdcache.store.sequence import create_sequence_store, open_sequence_store


def rows_of_every_kind(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 262_144, size=(64, 32))
    # every width from 0 to 32 bits, so codes start at every bit offset of a byte
    mixed = rng.integers(0, 2**32, size=(300, 16)) >> rng.integers(0, 33, size=(300, 16))
    padded = ids.copy()
    padded[:, 5:] = 0  # a sampled row with 5 distinct draws
    return [
        ids.astype(np.uint32),
        np.sort(ids, axis=1).astype(np.uint32),
        padded.astype(np.uint32),
        mixed.astype(np.uint32),
        np.sort(mixed, axis=1).astype(np.uint32),
        rng.integers(0, 2**32, size=(9, 7), dtype=np.uint64).astype(np.uint32),
        rng.integers(0, 256, size=(40, 12)).astype(np.uint8),
        np.sort(rng.integers(0, 9, size=(40, 12)), axis=1)[:, ::-1].astype(np.uint8),
        rng.integers(-30_000, 30_000, size=(20, 3)).astype(np.int16),
        np.zeros((5, 4), dtype=np.uint16),
        np.full((3, 1), 65_535, dtype=np.uint16),
        np.zeros((0, 6), dtype=np.uint32),
        -np.sort(np.abs(rng.normal(size=(30, 16)) * 6), axis=1).astype(np.float16),
        rng.normal(size=(11, 5)).astype(np.float32),
        np.array([[np.inf, -0.0, np.nan, 1.0]], dtype=np.float32),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_every_row_comes_back_bit_for_bit(seed):
    for values in rows_of_every_kind(seed):
        decoded = unpack_rows(pack_rows(values))
        assert decoded.dtype == values.dtype
        assert decoded.shape == values.shape
        assert decoded.tobytes() == values.tobytes(), values.dtype
        codec = PackedInts()
        assert codec.decode(codec.encode(values)).tobytes() == values.tobytes()


def test_ids_take_at_most_their_vocabularys_bits_and_sorted_or_padded_rows_fewer():
    rng = np.random.default_rng(0)
    vocab = 131_072
    ids = rng.integers(0, vocab, size=(2000, 32)).astype(np.uint32)
    bits = math.ceil(math.log2(vocab))
    per_row_header = 2 + 4 * 8 / 32  # mode/order and length bytes, spread over the ids
    assert 8 * len(pack_rows(ids)) / ids.size <= bits + per_row_header / 32 * 8
    assert len(pack_rows(np.sort(ids, axis=1))) < 0.85 * len(pack_rows(ids))
    padded = ids.copy()
    padded[:, 8:] = 0
    assert len(pack_rows(padded)) < 0.35 * len(pack_rows(ids))


def test_damaged_chunks_raise_value_error():
    packed = pack_rows(np.arange(64, dtype=np.uint32).reshape(8, 8))
    unreadable_dtype = packed[:5] + b"(1," + packed[8:]
    for damaged in (packed[:10], b"XXXX" + packed[4:], packed[:-3], unreadable_dtype):
        with pytest.raises(ValueError, match=CODEC_NAME):
            unpack_rows(damaged)


@pytest.mark.parametrize("encoding", ["topk:4", "sampled:6"])
def test_sparse_arrays_declare_the_codec_and_plain_zarr_reads_them(tmp_path, encoding):
    rng = np.random.default_rng(1)
    vocab = 70_000
    sequences = [rng.integers(0, vocab, size=n) for n in (5, 9)]
    logits = rng.normal(size=(12, vocab)).astype(np.float32) * 3
    path = tmp_path / "s.zarr"
    writer = create_sequence_store(path, sequences=sequences, vocab_size=vocab, encoding=encoding)
    writer.write([0, 1], logits)
    writer.finalize()
    packed = parse_encoding(encoding).packed_arrays
    for name in packed:
        codecs = json.loads((path / name / "zarr.json").read_text())["codecs"]
        assert codecs[0] == {"name": CODEC_NAME}
    want = parse_encoding(encoding).encode(logits)
    # A fresh interpreter with zarr and kdcache.store imported, nothing else, reads the arrays.
    script = (
        "import sys, zarr, numpy as np, kdcache.store; "
        "g = zarr.open_group(sys.argv[1], mode='r'); "
        "np.save(sys.stdout.buffer, np.stack([np.asarray(g[n][:], dtype=np.float64) "
        f"for n in {list(packed)!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, check=True
    ).stdout
    read = np.load(io.BytesIO(out))
    for position, name in enumerate(packed):
        np.testing.assert_array_equal(read[position], want[name].astype(np.float64))
    assert (
        zarr_array(zarr.open_group(str(path), mode="r"), packed[0]).dtype == want[packed[0]].dtype
    )
    assert open_sequence_store(path).store.encoding.name == encoding
