"""How a store represents teacher logits on disk, one class per encoding.

An encoding turns a float32 ``(B, C)`` block of raw logits into a few named arrays whose first
dimension is the row, and turns gathered rows of those arrays back into dense float32 logits.
The store never looks inside: it creates one Zarr array per name in :meth:`Encoding.layout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from kdcache.errors import SpecError

#: Per-row shape and dtype of every array an encoding stores, keyed by array name.
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


class Encoding(ABC):
    """A lossless or lossy representation of one row of teacher logits."""

    name: str

    @abstractmethod
    def layout(self, num_classes: int) -> Layout:
        """The arrays this encoding stores for a store of ``num_classes`` classes."""

    @abstractmethod
    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Encode float32 logits ``(B, C)`` into arrays shaped ``(B, *row_shape)``."""

    @abstractmethod
    def decode(self, arrays: dict[str, np.ndarray], *, temperature: float | None = None) -> np.ndarray:
        """Dense float32 logits ``(B, C)`` from gathered rows of every array in the layout.

        ``temperature`` matters only to lossy encodings whose best dense reconstruction depends on
        the temperature the logits will be softened with; exact encodings ignore it.
        """

    def row_nbytes(self, num_classes: int) -> int:
        """Uncompressed bytes one row occupies on disk."""
        return sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in self.layout(num_classes).values()
        )


class DenseEncoding(Encoding):
    """All C logits in a floating dtype: ``logits[i]`` is sample i's row, readable by any Zarr tool."""

    def __init__(self, dtype: str) -> None:
        self.name = dtype
        self.dtype = np.dtype(dtype)

    def layout(self, num_classes: int) -> Layout:
        return {"logits": ((num_classes,), self.dtype)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": logits.astype(self.dtype, copy=False)}

    def decode(self, arrays: dict[str, np.ndarray], *, temperature: float | None = None) -> np.ndarray:
        return arrays["logits"].astype(np.float32, copy=False)


ENCODING_CHOICES = ("float32", "float16")


def parse_encoding(spec: str) -> Encoding:
    """The encoding named by ``spec`` (one of :data:`ENCODING_CHOICES`)."""
    if spec in ("float32", "float16"):
        return DenseEncoding(spec)
    raise SpecError(f"unknown encoding {spec!r}; valid encodings: {', '.join(ENCODING_CHOICES)}")
