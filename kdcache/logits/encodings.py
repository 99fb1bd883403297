"""How a store represents teacher logits on disk, one class per encoding.

An encoding turns a float32 ``(B, C)`` block of raw logits into a few named arrays whose first
dimension is the row, and turns gathered rows of those arrays back into dense float32 logits.
The store never looks inside: it creates one Zarr array per name in :meth:`Encoding.layout`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.errors import ConfigError, SpecError
from kdcache.logits.sampled import (
    DRAW_SCHEMES,
    SampledLogits,
    check_draws_temperature,
    draw_samples,
)
from kdcache.logits.sparse import TAIL_STATS, SparseLogits, TeacherInput, tail_statistics
from kdcache.logits.viewset import (
    DEFAULT_BITS,
    MAX_BITS,
    MIN_BITS,
    class_sets,
    companded_grid,
    offset_codes,
    tail_codes,
    tail_from_codes,
)

#: Per-row shape and dtype of every array an encoding stores, keyed by array name.
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class ValueRange:
    """The values an array may hold: ``low <= v <= high`` (``low < v`` when ``low_open``).

    The digests prove that a chunk is the one written, not that what was written can be decoded:
    a class index >= C or a code beyond its grid would be clamped or index out of bounds
    silently, so readers, ``kdcache verify`` and the writer refuse such values by these ranges.
    """

    low: float
    high: float
    low_open: bool = False

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def outside(self, values: np.ndarray) -> np.ndarray:
        """Per row (first dimension) of ``values``, whether any value lies outside the range;
        NaN is left to the finiteness checks."""
        flat = values.reshape(len(values), -1)
        if flat.size:
            low, high = flat.min(), flat.max()  # the common case: two reductions, no mask
            if (low > self.low if self.low_open else low >= self.low) and high <= self.high:
                return np.zeros(len(values), dtype=bool)
        below = flat <= self.low if self.low_open else flat < self.low
        return np.asarray((below | (flat > self.high)).any(axis=1))

    def problem(self, name: str, values: np.ndarray, bad: np.ndarray) -> str:
        """One line naming ``name``, a value found outside the range in rows ``bad`` (B,) of
        ``values`` and the range."""
        flat = values[bad].reshape(int(bad.sum()), -1)
        below = flat <= self.low if self.low_open else flat < self.low
        found = flat[below | (flat > self.high)][0]
        return f"array {name!r} holds {found.item()!r}, outside its valid range {self}"


def _index_range(num_classes: int) -> ValueRange:
    return ValueRange(0, num_classes - 1)


def _code_range(bits: int) -> ValueRange:
    return ValueRange(0, (1 << bits) - 1)


class Encoding(ABC):
    """A lossless or lossy representation of one row of teacher logits."""

    name: str
    #: True when :meth:`sparse` gives the rows without a dense (B, C) tensor.
    is_sparse: bool = False
    #: Arrays of the layout whose rows are few small integers (ids, counts) or sorted offsets:
    #: the store codes them losslessly in about the bits they need (kdcache.packed_ints).
    packed_arrays: tuple[str, ...] = ()
    #: The store's number of classes C where an encoding needs it to size its id arrays or to
    #: reconstruct rows (the sparse ones); given by ``parse_encoding(spec, num_classes=C)``.
    num_classes: int | None = None

    def _classes(self, purpose: str) -> int:
        """:attr:`num_classes`, or a one-line error saying it is needed ``purpose``."""
        if self.num_classes is None:
            raise ConfigError(
                f"encoding {self.name} needs the number of classes {purpose}; "
                f"get it with parse_encoding({self.name!r}, num_classes=C)"
            )
        return self.num_classes

    @abstractmethod
    def layout(self, num_classes: int) -> Layout:
        """The arrays this encoding stores for a store of ``num_classes`` classes."""

    @abstractmethod
    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Encode float32 logits ``(B, C)`` into arrays shaped ``(B, *row_shape)``."""

    @abstractmethod
    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        """Dense float32 logits ``(B, C)`` from gathered rows of every array in the layout.

        ``temperature`` matters only to lossy encodings whose best dense reconstruction depends on
        the temperature the logits will be softened with (those require it); the others ignore it.
        """

    def value_ranges(self, num_classes: int) -> dict[str, ValueRange]:
        """The values each integer or scale array of the layout may hold, by name (arrays left
        out accept any finite value of their dtype)."""
        return {}

    def encode_views(self, logits: np.ndarray, samples: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`encode` rows of which ``samples`` (B,) names the sample each is a view of; an
        encoding that shares data between the views of one sample (``viewset:M``) uses it."""
        return self.encode(logits)

    def unrepresentable_rows(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        """Rows ``(B,)`` of an :meth:`encode` result that do not hold their logits: a value that
        overflowed a floating array (float16 holds magnitudes up to 65504). A reader refuses
        such rows as damage, so a writer must refuse them instead of storing them."""
        bad = np.zeros(len(next(iter(encoded.values()))), dtype=bool)
        for values in encoded.values():
            if np.issubdtype(values.dtype, np.floating):
                bad |= ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        return bad

    def teacher(self, arrays: dict[str, np.ndarray]) -> TeacherInput:
        """The rows in the form the losses take, correct at any temperature they soften at:
        :class:`~kdcache.logits.sparse.SparseLogits` for a sparse encoding, else dense (B, C)."""
        sparse = self.sparse(arrays)
        return sparse if sparse is not None else torch.from_numpy(self.decode(arrays))

    def check_distill_temperature(
        self, temperature: float, *, option: str = "--temperature"
    ) -> None:
        """Refuse, in one line naming ``option``, a temperature the rows cannot be distilled at
        (every encoding but ``sampled:S`` holds rows right at any)."""
        return None

    def sparse(self, arrays: dict[str, np.ndarray]) -> SparseLogits | None:
        """The rows in sparse form (:class:`~kdcache.logits.sparse.SparseLogits`); ``None`` for
        dense encodings."""
        return None

    def row_nbytes(self, num_classes: int) -> int:
        """Uncompressed bytes one row occupies on disk."""
        return sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in self.layout(num_classes).values()
        )


class DenseEncoding(Encoding):
    """All C logits in a floating dtype: ``logits[i]`` is sample i's row, readable by any Zarr
    tool."""

    def __init__(self, dtype: str) -> None:
        self.name = dtype
        self.dtype = np.dtype(dtype)

    def layout(self, num_classes: int) -> Layout:
        return {"logits": ((num_classes,), self.dtype)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": _convert(logits, self.dtype)}

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        return _convert(arrays["logits"], np.dtype(np.float32))


_TORCH_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
#: Below this many elements numpy converts: torch's thread pool costs more than it saves on a
#: busy machine (a 256 x 1000 batch took 10 ms instead of 0.2 ms with two threads under load).
_TORCH_CONVERT_MIN_ELEMENTS = 1 << 22


def _convert(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values.astype(dtype)``; large float16 <-> float32 blocks go through torch, several times
    faster than numpy's conversion, with the same round-to-nearest-even results."""
    if values.dtype == dtype:
        return values
    if (
        values.size >= _TORCH_CONVERT_MIN_ELEMENTS
        and values.dtype in _TORCH_FLOATS
        and dtype in _TORCH_FLOATS
        and values.flags.c_contiguous
    ):
        return torch.from_numpy(values).to(_TORCH_FLOATS[dtype]).numpy()
    return values.astype(dtype)


class Int8Encoding(Encoding):
    """Per-row affine quantisation to uint8: ``z = offset + scale * code``, error <= scale / 2.

    ``offset`` is the row's minimum and ``scale`` its range / 255, so each row uses all 256 levels
    whatever its scale; C + 8 bytes a row.
    """

    name = "int8"

    def layout(self, num_classes: int) -> Layout:
        return {
            "codes": ((num_classes,), np.dtype("uint8")),
            "offset": ((), np.dtype("float32")),
            "scale": ((), np.dtype("float32")),
        }

    def value_ranges(self, num_classes: int) -> dict[str, ValueRange]:
        # A scale of 0 or below would decode every code of the row to its offset, or flip it.
        return {"scale": ValueRange(0.0, float(np.finfo(np.float32).max), low_open=True)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        low = logits.min(axis=1)
        # A constant row has range 0; any positive scale then encodes it exactly.
        scale = np.maximum(logits.max(axis=1) - low, np.finfo(np.float32).tiny) / 255.0
        codes = np.rint((logits - low[:, None]) / scale[:, None])
        return {
            "codes": np.clip(codes, 0, 255).astype(np.uint8),
            "offset": low.astype(np.float32),
            "scale": scale.astype(np.float32),
        }

    def unrepresentable_rows(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        # The largest decoded value, offset + 255 * scale, must stay a float32 too.
        top = encoded["offset"].astype(np.float64) + 255.0 * encoded["scale"].astype(np.float64)
        too_wide = ~(np.abs(top) <= np.finfo(np.float32).max)
        return super().unrepresentable_rows(encoded) | too_wide

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        codes = arrays["codes"].astype(np.float32)
        return arrays["offset"][:, None] + arrays["scale"][:, None] * codes


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index below ``num_classes``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


#: From this many classes (language-model vocabularies) ``topk:K`` selects with torch.topk: 5-7x
#: faster per row than np.argpartition on one core at 32k-128k classes, and no faster at 1,000
#: (docs/benchmarks.md, "Where the time goes").
TORCH_TOPK_FROM_CLASSES = 4096


class TopKEncoding(Encoding):
    """The K largest raw logits, their class indices, and six statistics of the other classes.

    Per row: ``row_max`` (float32, the largest logit), ``topk_offsets`` (K float16: the K largest
    logits minus ``row_max``, descending), ``topk_indices`` (K, the smallest unsigned type that
    holds C) and ``tail`` (the :data:`~kdcache.logits.sparse.TAIL_STATS` minus ``row_max``,
    float16):
    4K + 16 bytes. Offsets from the max keep float16's relative error on the differences that
    decide the softmax rather than on the raw values. See :mod:`kdcache.logits.sparse` for the
    reconstruction at any temperature; ``decode`` needs that temperature.

    ``topk:K:BITS`` (``bits`` given) stores each offset as a BITS-bit code instead: ``topk_codes``
    (K uint8, non-decreasing) on :func:`~kdcache.logits.viewset.companded_grid` scaled to the
    row's own ``topk_depth`` (float16, at least the K-th offset's depth, so no offset is cut),
    within ``(sqrt(depth * |d|) + depth / 4L) / L`` of each offset ``d`` (L = 2^BITS - 1): fine
    near the maximum, where the softmax is decided. ``row_max`` is then float16 rounded to a
    quarter nat, a shift of the whole row that no softmax sees: 3K + 16 bytes raw, the codes'
    small steps coding in a few bits each.
    """

    is_sparse = True

    def __init__(self, k: int, *, bits: int | None = None, num_classes: int | None = None) -> None:
        self.k = k
        self.bits = bits
        self.name = f"topk:{k}" + ("" if bits is None else f":{bits}")
        self.num_classes = num_classes
        self.packed_arrays = (
            ("topk_indices", "topk_offsets") if bits is None else ("topk_indices", "topk_codes")
        )

    def layout(self, num_classes: int) -> Layout:
        if self.k >= num_classes:
            raise ConfigError(
                f"encoding {self.name} keeps {self.k} classes but the store has only "
                f"{num_classes}; "
                f"use topk:K with K < {num_classes}, or float16 to keep every class"
            )
        if self.bits is None:
            return {
                "row_max": ((), np.dtype("float32")),
                "topk_offsets": ((self.k,), np.dtype("float16")),
                "topk_indices": ((self.k,), index_dtype(num_classes)),
                "tail": ((len(TAIL_STATS),), np.dtype("float16")),
            }
        return {
            "row_max": ((), np.dtype("float16")),
            "topk_codes": ((self.k,), np.dtype("uint8")),
            "topk_depth": ((), np.dtype("float16")),
            "topk_indices": ((self.k,), index_dtype(num_classes)),
            "tail": ((len(TAIL_STATS),), np.dtype("float16")),
        }

    def value_ranges(self, num_classes: int) -> dict[str, ValueRange]:
        ranges = {"topk_indices": _index_range(num_classes)}
        if self.bits is not None:
            ranges["topk_codes"] = _code_range(self.bits)
            # A depth in nats (that of the K-th offset), not a count: only its sign is bounded.
            ranges["topk_depth"] = ValueRange(0.0, float(np.finfo(np.float16).max), low_open=True)
        return ranges

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        layout = self.layout(logits.shape[1])
        if logits.shape[1] >= TORCH_TOPK_FROM_CLASSES:
            selected = torch.topk(torch.from_numpy(np.ascontiguousarray(logits)), self.k, dim=1)
            top, values = selected.indices.numpy(), selected.values.numpy()
        else:
            # argpartition then a sort of K values: one numpy call per writer thread, which
            # scales over the threads where torch's shared intra-op pool made them wait.
            top = np.argpartition(logits, -self.k, axis=1)[:, -self.k :]
            values = np.take_along_axis(logits, top, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            top, values = (
                np.take_along_axis(top, order, axis=1),
                np.take_along_axis(values, order, axis=1),
            )
        return self._encode_selected(values, top, tail_statistics(logits, top).numpy(), layout)

    def encode_selected(
        self, values: np.ndarray, indices: np.ndarray, tail: np.ndarray
    ) -> dict[str, np.ndarray]:
        """:meth:`encode` from rows already reduced to what it keeps: the K largest float32
        logits (B, K) descending, their class ``indices`` (B, K) and the float32 ``tail``
        statistics (B, 6) (:mod:`kdcache.logits.reduced` selects them on the teacher's device).
        """
        num_classes = self._classes("to size its index array")
        return self._encode_selected(values, indices, tail, self.layout(num_classes))

    def _encode_selected(
        self, values: np.ndarray, top: np.ndarray, tail: np.ndarray, layout: Layout
    ) -> dict[str, np.ndarray]:
        row_max = values[:, :1]
        encoded = {
            "topk_indices": top.astype(layout["topk_indices"][1]),
            "tail": (tail - row_max).astype(np.float16),
        }
        if self.bits is None:
            encoded["row_max"] = row_max[:, 0].astype(np.float32)
            encoded["topk_offsets"] = (values - row_max).astype(np.float16)
        else:
            offsets = values - row_max
            depth = _depth_at_least(-offsets[:, -1])
            encoded["row_max"] = (np.rint(row_max[:, 0] * 4.0) / 4.0).astype(np.float16)
            encoded["topk_codes"] = offset_codes(
                offsets, self.bits, depth.astype(np.float32)[:, None]
            )
            encoded["topk_depth"] = depth
        return {name: encoded[name] for name in layout}

    def unrepresentable_rows(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        bad = super().unrepresentable_rows(encoded)
        if "topk_depth" in encoded:
            # A depth of 0 (or below) would code every kept class as the maximum.
            bad |= ~(encoded["topk_depth"] > 0)
        return bad

    def offsets(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The K kept logits of each row minus its ``row_max`` (B, K) float32, descending."""
        if self.bits is None:
            return arrays["topk_offsets"].astype(np.float32)
        unit = companded_grid(self.bits, 1.0)
        codes = np.minimum(arrays["topk_codes"], len(unit) - 1)
        return unit[codes] * np.asarray(arrays["topk_depth"], dtype=np.float32)[:, None]

    def sparse(self, arrays: dict[str, np.ndarray]) -> SparseLogits:
        num_classes = self._classes("to reconstruct rows")
        row_max = torch.from_numpy(np.asarray(arrays["row_max"], dtype=np.float32))[:, None]
        return SparseLogits(
            values=torch.from_numpy(self.offsets(arrays)) + row_max,
            indices=torch.from_numpy(arrays["topk_indices"].astype(np.int64)),
            tail=torch.from_numpy(arrays["tail"].astype(np.float32)) + row_max,
            num_classes=num_classes,
        )

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        sparse = self.sparse(arrays)
        if temperature is None:
            raise ConfigError(
                f"a dense {self.name} row depends on the temperature it is softened at: pass "
                "temperature=T (the one you distill at), or use the sparse rows, which every "
                "loss softens at its own temperature"
            )
        return sparse.dense(temperature).numpy()


def _depth_at_least(spans: np.ndarray) -> np.ndarray:
    """float16 depths (B,), each the nearest float16 at or above ``spans`` (B,) and above 0."""
    spans = np.maximum(spans.astype(np.float32), np.float32(np.finfo(np.float16).tiny))
    depth = spans.astype(np.float16)
    short = depth.astype(np.float32) < spans
    depth[short] = np.nextafter(depth[short], np.float16(np.inf))
    return depth


class SampledEncoding(Encoding):
    """S draws from the teacher's softmax at T = 1, kept as distinct classes and counts.

    Per row: ``sample_indices`` (S, the smallest unsigned type that holds C) and ``sample_counts``
    (S uint8): 3S bytes for C <= 65536. An unbiased estimate of the teacher's distribution (see
    :mod:`kdcache.logits.sampled`) rather than its best approximation row by row: ``decode`` gives
    log(count / S) to the drawn classes and a floor 30 nats lower to the others.
    ``sampled:S:systematic`` takes the draws systematically (less noise, the same arrays, read
    the same way); ``sampled:S`` independently.
    """

    # Ascending ids pack to their gaps; counts in id order (mostly 1) are left to zstd, which
    # codes them in fewer bytes than packed rows with their per-row headers.
    packed_arrays = ("sample_indices",)

    def __init__(
        self, num_draws: int, *, scheme: str = DRAW_SCHEMES[0], num_classes: int | None = None
    ) -> None:
        self.num_draws = num_draws
        self.scheme = scheme
        self.name = f"sampled:{num_draws}" + ("" if scheme == DRAW_SCHEMES[0] else f":{scheme}")
        self.num_classes = num_classes

    def layout(self, num_classes: int) -> Layout:
        if self.num_draws > num_classes:
            raise ConfigError(
                f"encoding {self.name} keeps up to {self.num_draws} distinct classes but the "
                f"store has only {num_classes}; use sampled:S with S <= {num_classes}, or "
                "float16 to keep every class"
            )
        return {
            "sample_indices": ((self.num_draws,), index_dtype(num_classes)),
            "sample_counts": ((self.num_draws,), np.dtype("uint8")),
        }

    def value_ranges(self, num_classes: int) -> dict[str, ValueRange]:
        return {
            "sample_indices": _index_range(num_classes),
            "sample_counts": ValueRange(0, self.num_draws),
        }

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        classes, counts = draw_samples(logits, self.num_draws, scheme=self.scheme)
        dtype = self.layout(logits.shape[1])["sample_indices"][1]
        return {"sample_indices": classes.astype(dtype), "sample_counts": counts}

    def encode_drawn(self, classes: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of rows drawn elsewhere (:func:`kdcache.logits.sampled.draw_rows` on the
        teacher's device): ``classes`` (B, S) ascending with their ``counts`` (B, S)."""
        num_classes = self._classes("to size its index array")
        dtype = self.layout(num_classes)["sample_indices"][1]
        return {
            "sample_indices": classes.astype(dtype),
            "sample_counts": counts.astype(np.uint8),
        }

    def check_distill_temperature(
        self, temperature: float, *, option: str = "--temperature"
    ) -> None:
        check_draws_temperature(temperature, option=option)

    def sampled(self, arrays: dict[str, np.ndarray]) -> SampledLogits:
        """The rows as class shares (B, S), never as a dense (B, C) tensor."""
        num_classes = self._classes("to reconstruct rows")
        counts = torch.from_numpy(arrays["sample_counts"].astype(np.float32))
        return SampledLogits(
            indices=torch.from_numpy(arrays["sample_indices"].astype(np.int64)),
            probs=counts / self.num_draws,
            num_classes=num_classes,
        )

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        rows = self.sampled(arrays)
        log_probs = torch.log(rows.probs.clamp_min(1e-30))
        floor = math.log(1.0 / self.num_draws) - 30.0
        out = torch.full((rows.indices.shape[0], rows.num_classes), floor)
        drawn = rows.probs > 0
        # Padding slots (count 0) point at class 0; scattering them last would hide a real draw.
        out.scatter_(
            1,
            torch.where(drawn, rows.indices, rows.indices[:, :1]),
            log_probs.where(drawn, log_probs[:, :1]),
        )
        return out.numpy()


class ViewSetEncoding(Encoding):
    """A class set of M classes shared by a sample's views, with BITS-bit offsets per view.

    Per row: ``set_indices`` (M, ascending, the same in every view of a sample), ``set_codes``
    (M uint8, the view's offset from its maximum of each set class on a companded grid),
    ``row_max`` (float16, to a quarter nat) and ``tail_codes`` (6 uint8, the tail statistics of
    the other classes): 3M + 8 bytes raw, the V copies of the set compressing to one. See
    :mod:`kdcache.logits.viewset`; ``decode`` needs the temperature, as ``topk:K``'s does.
    """

    is_sparse = True

    def __init__(
        self, set_size: int, *, bits: int = DEFAULT_BITS, num_classes: int | None = None
    ) -> None:
        self.set_size = set_size
        self.bits = bits
        self.name = f"viewset:{set_size}" + ("" if bits == DEFAULT_BITS else f":{bits}")
        self.num_classes = num_classes
        self.grid = companded_grid(bits)

    def layout(self, num_classes: int) -> Layout:
        if self.set_size >= num_classes:
            raise ConfigError(
                f"encoding {self.name} keeps a set of {self.set_size} classes but the store has "
                f"only {num_classes}; use viewset:M with M < {num_classes}, or float16 to keep "
                "every class"
            )
        return {
            "set_indices": ((self.set_size,), index_dtype(num_classes)),
            "set_codes": ((self.set_size,), np.dtype("uint8")),
            "row_max": ((), np.dtype("float16")),
            "tail_codes": ((len(TAIL_STATS),), np.dtype("uint8")),
        }

    def value_ranges(self, num_classes: int) -> dict[str, ValueRange]:
        return {"set_indices": _index_range(num_classes), "set_codes": _code_range(self.bits)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return self.encode_views(logits, np.arange(len(logits)))

    def encode_views(self, logits: np.ndarray, samples: np.ndarray) -> dict[str, np.ndarray]:
        layout = self.layout(logits.shape[1])
        row_max = logits.max(axis=1)
        offsets = logits - row_max[:, None]
        sets = class_sets(offsets, np.asarray(samples), self.set_size)
        tail = tail_statistics(logits, sets).numpy().astype(np.float64)
        return {
            "set_indices": sets.astype(layout["set_indices"][1]),
            "set_codes": offset_codes(np.take_along_axis(offsets, sets, axis=1), self.bits),
            # Every decoded value is the stored maximum plus an offset from the true one:
            # rounding the maximum to a quarter nat shifts a whole row alike, which no softmax
            # sees, and leaves float16 fewer distinct low bytes to compress.
            "row_max": (np.rint(row_max * 4.0) / 4.0).astype(np.float16),
            "tail_codes": tail_codes(tail, row_max.astype(np.float64)),
        }

    def sparse(self, arrays: dict[str, np.ndarray]) -> SparseLogits:
        num_classes = self._classes("to reconstruct rows")
        row_max = np.asarray(arrays["row_max"], dtype=np.float32)
        grid = self.grid[np.minimum(arrays["set_codes"], len(self.grid) - 1)]
        values = torch.from_numpy(row_max[:, None] + grid)
        indices = torch.from_numpy(arrays["set_indices"].astype(np.int64))
        # Descending, as topk:K's: the first is the top class.
        order = torch.argsort(values, dim=1, descending=True, stable=True)
        return SparseLogits(
            values=values.gather(1, order),
            indices=indices.gather(1, order),
            tail=torch.from_numpy(tail_from_codes(arrays["tail_codes"], row_max)),
            num_classes=num_classes,
        )

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        if temperature is None:
            raise ConfigError(
                f"a dense {self.name} row depends on the temperature it is softened at: pass "
                "temperature=T (the one you distill at), or use the sparse rows, which every "
                "loss softens at its own temperature"
            )
        return self.sparse(arrays).dense(temperature).numpy()


#: Draws per row are counted in uint8.
MAX_DRAWS = 255


def _dense(dtype: str) -> Callable[[str, str, int | None], Encoding]:
    return lambda spec, argument, num_classes: DenseEncoding(dtype)


def _int8(spec: str, argument: str, num_classes: int | None) -> Encoding:
    return Int8Encoding()


def _topk(spec: str, argument: str, num_classes: int | None) -> Encoding:
    k, sep, bits = argument.partition(":")
    if not (
        k.isdigit()
        and int(k) >= 1
        and (not sep or (bits.isdigit() and MIN_BITS <= int(bits) <= MAX_BITS))
    ):
        raise SpecError(
            f"malformed encoding {spec!r}; expected topk:K with an integer K >= 1, or "
            f"topk:K:BITS with BITS in [{MIN_BITS}, {MAX_BITS}] (values in BITS-bit codes), "
            "e.g. topk:20 or topk:32:8"
        )
    return TopKEncoding(int(k), bits=int(bits) if sep else None, num_classes=num_classes)


def _sampled(spec: str, argument: str, num_classes: int | None) -> Encoding:
    draws, sep, scheme = argument.partition(":")
    if not (
        draws.isdigit() and 1 <= int(draws) <= MAX_DRAWS and (not sep or scheme in DRAW_SCHEMES[1:])
    ):
        raise SpecError(
            f"malformed encoding {spec!r}; expected sampled:S with an integer S in "
            f"[1, {MAX_DRAWS}], or sampled:S:systematic (evenly spaced draws), e.g. sampled:12"
        )
    return SampledEncoding(int(draws), scheme=scheme or DRAW_SCHEMES[0], num_classes=num_classes)


def _viewset(spec: str, argument: str, num_classes: int | None) -> Encoding:
    size, sep, bits = argument.partition(":")
    if not (
        size.isdigit()
        and int(size) >= 1
        and (not sep or (bits.isdigit() and MIN_BITS <= int(bits) <= MAX_BITS))
    ):
        raise SpecError(
            f"malformed encoding {spec!r}; expected viewset:M or viewset:M:BITS with an integer "
            f"M >= 1 and BITS in [{MIN_BITS}, {MAX_BITS}], e.g. viewset:16"
        )
    if bits:
        return ViewSetEncoding(int(size), bits=int(bits), num_classes=num_classes)
    return ViewSetEncoding(int(size), num_classes=num_classes)


@dataclass(frozen=True)
class EncodingKind:
    """One entry of :data:`ENCODINGS`: how its spec is written, an example, how it is built.

    ``build(spec, argument, num_classes)`` gets the whole spec (for messages) and the text after
    ``NAME:`` (empty for a ``form`` without an argument).
    """

    form: str
    example: str
    build: Callable[[str, str, int | None], Encoding]


#: Every encoding a store can use, by the name before any ``:``.
ENCODINGS: dict[str, EncodingKind] = {
    "float32": EncodingKind("float32", "float32", _dense("float32")),
    "float16": EncodingKind("float16", "float16", _dense("float16")),
    "int8": EncodingKind("int8", "int8", _int8),
    "topk": EncodingKind("topk:K[:BITS]", "topk:20", _topk),
    "sampled": EncodingKind("sampled:S[:systematic]", "sampled:12", _sampled),
    "viewset": EncodingKind("viewset:M", "viewset:16", _viewset),
}
#: The forms :func:`parse_encoding` accepts, for messages.
ENCODING_CHOICES = tuple(kind.form for kind in ENCODINGS.values())


def parse_encoding(spec: str, *, num_classes: int | None = None) -> Encoding:
    """The encoding named by ``spec``, one of :data:`ENCODINGS` (see :data:`ENCODING_CHOICES`).

    ``num_classes`` binds a sparse encoding to its store's class count, which ``decode`` needs.
    """
    name, sep, argument = str(spec).partition(":")
    kind = ENCODINGS.get(name)
    if kind is None or (sep and ":" not in kind.form):
        raise SpecError(
            f"unknown encoding {spec!r}; valid encodings: {', '.join(ENCODING_CHOICES)} "
            "(e.g. topk:20)"
        )
    return kind.build(str(spec), argument, num_classes)
