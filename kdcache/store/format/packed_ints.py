"""``kdcache.packed_ints``: a lossless Zarr v3 (and numcodecs) codec for rows of small integers.

Sparse encodings store, per token, a few ids out of a vocabulary of up to 262,144 and a few
counts or half-precision offsets. Plain ``bytes`` + zstd gives each id its whole dtype (4 bytes
above 65,536 classes), and zstd finds little to remove in random ids. This codec writes each row
of a chunk ``(rows, K)`` in about as many bits as its values need:

* a row whose values are non-decreasing (or non-increasing) is coded as its first value and the
  differences between neighbours, which are small; any other row as the values themselves;
* a row's trailing run of one repeated value (the padding of a ``sampled:S`` row, which has fewer
  than S distinct draws) is coded once;
* a row's coded values ``e`` are either all of one fixed width (the bits of the row's widest,
  at most ``ceil(log2 V)`` for ids below ``V``) or exponential-Golomb codes of order ``k``,
  whichever is shorter, with ``k`` chosen per row: ``x = (e >> k) + 1`` of bit length ``z + 1``
  costs ``z`` zeros and a one (the *prefix*), then the ``z`` low bits of ``x`` and the ``k`` low
  bits of ``e`` (the *suffix*), ``2z + 1 + k`` bits: few for values that are close together or
  small, and only logarithmically more for an outlier.

Prefixes and suffixes go into two bit streams, so both directions are a few numpy passes (no
Python loop over values). Floating arrays are coded through their bit patterns (lossless):
``topk:K`` offsets from the row maximum are non-positive and descending, so their float16 bit
patterns are non-decreasing and delta-code well.

Layout of an encoded chunk (little-endian): ``b"KDPI"``, version (u8), the dtype's numpy ``str``
(3 ASCII bytes, e.g. ``<u4``), rows R (u32), columns K (u32), prefix bits (u64); then per row
``mode << 6 | fixed << 5 | k`` (u8; mode 0 plain, 1 non-decreasing, 2 non-increasing; k the
Golomb order, or the width minus one for a fixed-width row), per row the coded length (u8, u16
or u32 by K), the prefix stream (Golomb rows only), the suffix stream.

Importing :mod:`kdcache.store` registers the codec with zarr (``kdcache.packed_ints`` in each
array's ``zarr.json``) and with numcodecs; an installed kdcache also declares both as entry
points, so plain ``zarr.open`` reads such arrays with kdcache merely installed.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from numcodecs.abc import Codec
from numcodecs.registry import register_codec as register_numcodec
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

__all__ = [
    "CODEC_NAME",
    "PackedInts",
    "PackedIntsCodec",
    "pack_rows",
    "unpack_rows",
]

#: The codec's name in ``zarr.json`` and its numcodecs id.
CODEC_NAME = "kdcache.packed_ints"
_MAGIC = b"KDPI"
_VERSION = 1
_HEADER = struct.Struct("<4sB3sIIQ")
#: Widths (bytes) of the values the codec takes: ids and counts (uint8/16/32), float16/32.
_ITEMSIZES = (1, 2, 4)
_PLAIN, _RISING, _FALLING = 0, 1, 2
#: Golomb orders go up to 31 (5 bits of a row's parameter byte): enough for 32-bit values.
_MAX_ORDER = 31
#: The longest suffix code a chunk may declare. Valid chunks' codes take at most 33 bits (a
#: Golomb code of a 32-bit value); 57 is what one 64-bit word read at any bit offset holds.
_MAX_CODE_BITS = 57


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits of each positive int64 below 2**53 (exact through float64's exponent)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _coded_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's mode, its coded length (trailing repeats dropped) and the values to code."""
    columns = rows.shape[1]
    signed = rows.astype(np.int64)
    repeats = signed == signed[:, -1:]
    trailing = np.where(repeats.all(axis=1), columns, np.argmin(repeats[:, ::-1], axis=1))
    lengths = columns - trailing + 1
    inside = np.arange(columns) < lengths[:, None]
    steps = np.diff(signed, axis=1)
    counted = inside[:, 1:]
    rising = ((steps >= 0) | ~counted).all(axis=1)
    falling = ((steps <= 0) | ~counted).all(axis=1)
    modes = np.where(rising, _RISING, np.where(falling, _FALLING, _PLAIN)).astype(np.int64)
    coded = signed.copy()
    mode = modes[:, None]
    coded[:, 1:] = np.where(
        mode == _RISING, steps, np.where(mode == _FALLING, -steps, signed[:, 1:])
    )
    return modes, lengths, np.where(inside, coded, 0)


def _best_codes(coded: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether fixed-width codes beat Golomb codes, and the order k (Golomb) or the
    width in bits (fixed) that codes the row in the fewest bits.

    A Golomb code of ``e`` with ``b`` significant bits costs about ``k + 1 + 2 max(b - k, 0)``
    bits (exactly, one bit more when ``e >> k`` is all ones); a fixed-width row costs its widest
    value's bits per value, which wins for values spread evenly over their range.
    """
    significant = np.where(inside, _bit_length(coded) * (coded > 0), 0)
    rows = len(coded)
    # How many values of each row have b bits, then the bits above order k by a matrix product.
    widths_seen = np.bincount(
        (np.arange(rows)[:, None] * 33 + significant)[inside], minlength=rows * 33
    ).reshape(rows, 33)
    orders = np.arange(_MAX_ORDER + 1)
    above = np.maximum(np.arange(33)[:, None] - orders, 0)
    counted = inside.sum(axis=1)
    golomb = counted[:, None] * (orders + 1) + 2 * (widths_seen @ above)
    best = np.argmin(golomb, axis=1)
    widths = np.maximum(significant.max(axis=1), 1)
    fixed = widths * counted < golomb[np.arange(len(best)), best]
    return fixed, np.where(fixed, widths, best).astype(np.int64)


def _write_bits(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bytes of ``values`` (int64, each below 2^length) written one after the other in
    ``lengths`` bits each (0 to 33), most significant bit first (np.packbits' order).

    Each value is shifted into a 64-bit window starting at its first byte; the windows' bytes
    are summed into the stream by byte index (values occupy disjoint bits, so a sum is an OR):
    five passes over the values rather than one per bit.
    """
    total = int(lengths.sum())
    size = (total + 7) // 8
    starts = np.cumsum(lengths) - lengths
    first = starts >> 3
    drop = np.uint64(64) - (starts & 7).astype(np.uint64) - lengths.astype(np.uint64)
    window = np.where(lengths > 0, values.astype(np.uint64) << (drop & np.uint64(63)), 0)
    stream = np.zeros(size + 8, dtype=np.float64)
    for byte in range(5):  # a code of at most 33 bits, from any bit offset, spans 5 bytes
        part = (window >> np.uint64(56 - 8 * byte)) & np.uint64(255)
        stream += np.bincount(first + byte, weights=part, minlength=size + 8)[: size + 8]
    return stream[:size].astype(np.uint8)


def pack_rows(values: np.ndarray) -> bytes:
    """Encode ``values`` (any shape, last axis = a row; an unsigned, signed or floating dtype of
    1, 2 or 4 bytes) as described in the module docstring."""
    array = np.ascontiguousarray(values)
    if array.dtype.itemsize not in _ITEMSIZES or array.dtype.kind not in "uif":
        raise ValueError(f"{CODEC_NAME} codes 1-, 2- or 4-byte numbers, got {array.dtype}")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    columns = array.shape[-1] if array.ndim else 1
    rows = array.view(f"<u{array.dtype.itemsize}").reshape(-1, columns)
    header_dtype = array.dtype.str.encode("ascii")
    if rows.size == 0:
        return _HEADER.pack(_MAGIC, _VERSION, header_dtype, len(rows), columns, 0)
    modes, lengths, coded = _coded_rows(rows)
    inside = np.arange(columns) < lengths[:, None]
    fixed, orders = _best_codes(coded, inside)
    elements = coded[inside]
    element_fixed = np.repeat(fixed, lengths)
    element_orders = np.repeat(orders, lengths)
    golomb_orders = np.where(element_fixed, 0, element_orders)
    shifted = (elements >> golomb_orders) + 1
    prefix = np.where(element_fixed, 0, _bit_length(shifted) - 1)
    ends = np.cumsum(np.where(element_fixed, 0, prefix + 1))
    prefix_bits = np.zeros(int(ends[-1]), dtype=np.uint8)
    prefix_bits[ends[~element_fixed] - 1] = 1
    golomb_suffix = ((shifted - (np.int64(1) << prefix)) << golomb_orders) | (
        elements & ((np.int64(1) << golomb_orders) - 1)
    )
    suffix = np.where(element_fixed, elements, golomb_suffix)
    suffix_length = np.where(element_fixed, element_orders, prefix + golomb_orders)
    suffix_bits = _write_bits(suffix, suffix_length)
    header = _HEADER.pack(_MAGIC, _VERSION, header_dtype, len(rows), columns, int(prefix_bits.size))
    params = modes << 6 | fixed.astype(np.int64) << 5 | np.where(fixed, orders - 1, orders)
    return b"".join(
        (
            header,
            params.astype(np.uint8).tobytes(),
            lengths.astype(_length_dtype(columns)).tobytes(),
            np.packbits(prefix_bits).tobytes(),
            suffix_bits.tobytes(),
        )
    )


def _length_dtype(columns: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16):
        if columns <= np.iinfo(dtype).max:
            return np.dtype(dtype).newbyteorder("<")
    return np.dtype("<u4")


def _read_bits(stream: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The unsigned values (int64) of ``lengths`` bits each (0 to :data:`_MAX_CODE_BITS`) that the
    bytes ``stream`` hold one after the other, most significant bit first (np.packbits' order):
    what :func:`_write_bits` wrote.

    Each value is read as one big-endian 64-bit word from its first byte, shifted to its first
    bit: a few passes over the values rather than one per bit (5-8 times faster than that on
    chunks of ids and offsets; docs/benchmarks.md).
    """
    starts = np.cumsum(lengths) - lengths
    padded = np.zeros(stream.size + 8, dtype=np.uint8)
    padded[: stream.size] = stream
    # np.take copies the 8-byte windows twice as fast as indexing the view with the first bytes
    words = np.take(np.lib.stride_tricks.sliding_window_view(padded, 8), starts >> 3, axis=0)
    word = words.view(">u8")[:, 0].astype(np.uint64) << (starts & 7).astype(np.uint64)
    drop = np.uint64(64) - np.maximum(lengths, 1).astype(np.uint64)
    return np.where(lengths > 0, word >> drop, np.uint64(0)).astype(np.int64)


def unpack_rows(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The ``(rows, K)`` array :func:`pack_rows` encoded, in its dtype; damaged bytes raise
    ``ValueError``."""
    buffer = memoryview(data).cast("B")
    if len(buffer) < _HEADER.size:
        raise ValueError(f"{CODEC_NAME}: {len(buffer)} bytes is shorter than the header")
    magic, version, dtype_text, count, columns, prefix_total = _HEADER.unpack_from(buffer)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"{CODEC_NAME}: not a version-{_VERSION} chunk (header {magic!r})")
    try:
        dtype = np.dtype(dtype_text.decode("ascii"))
    except (TypeError, SyntaxError, ValueError):  # what np.dtype raises for text it cannot read
        dtype = None
    if dtype is None or dtype.itemsize not in _ITEMSIZES or dtype.kind not in "uif":
        raise ValueError(f"{CODEC_NAME}: the header's dtype {dtype_text!r} is not one it codes")
    width = 8 * dtype.itemsize
    if count == 0:
        return np.zeros((0, columns), dtype=dtype)
    position = _HEADER.size
    params = np.frombuffer(buffer, dtype=np.uint8, count=count, offset=position).astype(np.int64)
    position += count
    length_dtype = _length_dtype(columns)
    lengths = np.frombuffer(buffer, dtype=length_dtype, count=count, offset=position)
    lengths = lengths.astype(np.int64)
    position += count * length_dtype.itemsize
    modes, fixed = params >> 6, (params >> 5 & 1).astype(bool)
    orders = np.where(fixed, (params & 31) + 1, params & 31)
    if ((lengths < 1) | (lengths > columns)).any() or (modes > _FALLING).any():
        raise ValueError(f"{CODEC_NAME}: a row header is out of range")
    prefix_bytes = (prefix_total + 7) // 8
    stream = np.frombuffer(buffer, dtype=np.uint8, offset=position)
    if stream.size < prefix_bytes:
        raise ValueError(f"{CODEC_NAME}: the chunk ends inside its prefix stream")
    ends = np.flatnonzero(np.unpackbits(stream[:prefix_bytes], count=prefix_total))
    total = int(lengths.sum())
    element_fixed = np.repeat(fixed, lengths)
    if ends.size != total - int(element_fixed.sum()):
        raise ValueError(f"{CODEC_NAME}: {ends.size} codes for {total} values")
    prefix = np.zeros(total, dtype=np.int64)
    prefix[~element_fixed] = np.diff(ends, prepend=-1) - 1
    element_orders = np.repeat(orders, lengths)
    golomb_orders = np.where(element_fixed, 0, element_orders)
    suffix_length = np.where(element_fixed, element_orders, prefix + golomb_orders)
    suffix_stream = stream[prefix_bytes:]
    if int(suffix_length.sum()) > 8 * suffix_stream.size or (suffix_length > _MAX_CODE_BITS).any():
        raise ValueError(f"{CODEC_NAME}: the chunk ends inside its suffix stream")
    suffix = _read_bits(suffix_stream, suffix_length)
    low = suffix & ((np.int64(1) << golomb_orders) - 1)
    shifted = (np.int64(1) << prefix) + (suffix >> golomb_orders)
    elements = np.where(element_fixed, suffix, ((shifted - 1) << golomb_orders) | low)
    inside = np.arange(columns) < lengths[:, None]
    coded = np.zeros((count, columns), dtype=np.int64)
    coded[inside] = elements
    falling = modes == _FALLING
    coded[falling, 1:] *= -1
    deltas = modes != _PLAIN
    coded[deltas] = np.cumsum(coded[deltas], axis=1)
    last = coded[np.arange(count), lengths - 1]
    values = np.where(inside, coded, last[:, None])
    if (values < 0).any() or (values >> width).any():
        raise ValueError(f"{CODEC_NAME}: decoded values exceed {dtype}")
    return values.astype(f"<u{dtype.itemsize}").view(dtype.newbyteorder("<")).astype(dtype)


class PackedInts(Codec):
    """The numcodecs face of the codec (``numcodecs.get_codec({"id": "kdcache.packed_ints"})``);
    :func:`decode` gives the ``(rows, K)`` array."""

    codec_id = CODEC_NAME

    def encode(self, buf: Any) -> bytes:
        return pack_rows(np.asarray(buf))

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        values = unpack_rows(buf)
        if out is not None:
            target = np.asarray(out)
            target.reshape(-1).view(values.dtype)[:] = values.reshape(-1)
            return target
        return values


@dataclass(frozen=True)
class PackedIntsCodec(ArrayBytesCodec):
    """The Zarr v3 array-to-bytes codec (in place of ``bytes``) for :func:`pack_rows`."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": CODEC_NAME}

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        native = dtype.to_native_dtype()
        if native.itemsize not in _ITEMSIZES or native.kind not in "uif":
            raise ValueError(f"{CODEC_NAME} codes 1-, 2- or 4-byte numbers, got {native}")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        values = await asyncio.to_thread(unpack_rows, chunk_bytes.to_bytes())
        expected = chunk_spec.dtype.to_native_dtype()
        if values.dtype != expected or values.size != np.prod(chunk_spec.shape):
            raise ValueError(
                f"{CODEC_NAME}: the chunk holds {values.size} {values.dtype} values, the array "
                f"{int(np.prod(chunk_spec.shape))} {expected}"
            )
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        packed = await asyncio.to_thread(pack_rows, chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(packed)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size: the chunk's bits depend on its values


register_codec(CODEC_NAME, PackedIntsCodec)
register_numcodec(PackedInts)
