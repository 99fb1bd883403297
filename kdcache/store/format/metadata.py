"""The metadata a kdcache store keeps in its Zarr group attributes, as a typed, versioned record.

The record lives under the single attribute key ``"kdcache"`` so that other tools can add their
own attributes beside it. It is plain JSON: nothing from a store is ever executed or unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.store.format.digests import chunk_binding
from kdcache.store.format.schema import check_record_digest, validate_record

__all__ = [
    "ATTRIBUTE_KEY",
    "FORMAT_VERSION",
    "PLAIN_FORMAT_VERSION",
    "StoreMetadata",
]

#: Newest on-disk layout this kdcache reads and writes; readers refuse newer versions. Version 2
#: adds views (rows keyed by sample and view, ``view_params``); a store without views is still
#: written as version 1, so older kdcache releases keep reading it.
FORMAT_VERSION = 2
PLAIN_FORMAT_VERSION = 1
ATTRIBUTE_KEY = "kdcache"


@dataclass(frozen=True, kw_only=True)
class StoreMetadata:
    """Everything needed to trust and use a store without the teacher.

    ``teacher`` holds ``spec`` and ``weights_sha256``; ``dataset`` holds ``spec``, ``split``,
    ``transform`` and ``fingerprint``; both are ``None`` for stores built from logits computed
    elsewhere. ``complete`` flips to true only once every row is durably written.

    ``views`` is V, the augmented views stored per sample: every per-sample array has
    ``num_rows = num_samples * views`` rows, row ``sample * views + view``. ``augment`` holds the
    ``recipe`` spec, its ``seed``, the parameter ``fields`` of ``view_params`` and the
    ``input_size`` the views were drawn for; ``None`` for a store of clean inputs.
    """

    num_samples: int
    num_classes: int
    encoding: str
    chunk_rows: int
    format_version: int = FORMAT_VERSION
    teacher: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    kdcache_version: str = ""
    created_at: str = ""
    complete: bool = False
    #: Fidelity of the encoding measured while writing (kdcache.logits.fidelity.Fidelity.to_dict());
    #: None in stores written before it was recorded.
    fidelity: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Random id written when the store is created; a reader stops if it changes under it
    #: (the store was overwritten). Empty in stores written before it was recorded.
    generation: str = ""
    #: Each array's zarr metadata (shape, chunks, dtype, codecs, ...) as created, so that an
    #: edited zarr.json is refused; None in older stores.
    arrays: dict[str, Any] | None = None
    #: ``{"algorithm", "arrays", "whole", "record"}`` (kdcache.store.format.digests): the per-chunk
    #: digest table's layout (binds every row chunk to its index), the digest of every array
    #: written once and of the record itself. None in older stores, which are unverified by
    #: index; ``whole`` and ``record`` are absent in stores written before they were recorded.
    digests: dict[str, Any] | None = None
    views: int = 1
    augment: dict[str, Any] | None = None

    @property
    def num_rows(self) -> int:
        """Rows in every per-sample array: one per view of every sample."""
        return self.num_samples * self.views

    @property
    def chunk_binding(self) -> str:
        """What every row chunk's digest is bound to (kdcache.store.format.digests)."""
        return chunk_binding(self.generation, self.digests)

    @property
    def num_chunks(self) -> int:
        """Row chunks in every per-sample array (the last one may be partial)."""
        return -(-self.num_rows // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last row of row chunk ``chunk`` (rows are samples when V = 1)."""
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_rows)

    def rows_of_chunks(self, chunks: np.ndarray) -> np.ndarray:
        """The rows the given row chunks hold, in chunk order."""
        ranges = [
            np.arange(*self.chunk_bounds(int(chunk))) for chunk in np.asarray(chunks).reshape(-1)
        ]
        return np.concatenate(ranges) if ranges else np.empty(0, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> StoreMetadata:
        """Rebuild the record from a group's attributes, refusing what this version cannot read or
        what fails the schema (kdcache.store.format.schema)."""
        validate_record(data, where=where, format_version=FORMAT_VERSION)
        known = {f.name for f in dataclasses.fields(cls)}
        metadata = cls(**{key: value for key, value in data.items() if key in known})
        check_record_digest(metadata.to_dict(), where=where)
        return metadata

    def replace(self, **changes: Any) -> StoreMetadata:
        return dataclasses.replace(self, **changes)
