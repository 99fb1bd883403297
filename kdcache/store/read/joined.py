"""Stores of disjoint parts of one dataset, read in place as one store of the whole dataset.

A *joined store* (``kdcache concat PARTS --out J --link``) is a Zarr group that holds no rows:
its attributes (:data:`JOINED_KEY`) name each part (its path or URL) and what identified it
when it was joined (its ``generation``, the sha256 of its chunk digest table and its record
digest). :func:`~kdcache.store.read.reader.open_store` opens each part, refuses one that is
missing or changed, and reads the whole as any store: sample i of the joined store is sample i
of the dataset, held by the part whose ``dataset_indices`` name it. This module holds what the
reader needs for that: the record, the checks that the parts make one dataset (shared with
``kdcache concat``), and :class:`JoinedFeed`, the logit feed over the parts' own feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdcache.errors import StoreFormatError, StoreMismatchError
from kdcache.store.format.layout import row_ranges
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.read.feed import Feed, RowSource

__all__ = [
    "JOINED_FORMAT",
    "JOINED_FROM_KEY",
    "JOINED_KEY",
    "PART_FIELDS",
    "JoinedFeed",
    "common_extra",
    "is_joined",
    "part_identity",
    "read_joined_record",
    "refuse_different_parts",
    "sample_owners",
    "whole_dataset",
    "whole_size",
]

#: Attribute key of a joined store's record (a store of rows has ``"kdcache"`` instead).
JOINED_KEY = "kdcache_joined"
#: Version of that record this kdcache reads and writes.
JOINED_FORMAT = 1
#: Where a joined store's metadata lists its parts (``extra``).
JOINED_FROM_KEY = "joined_from"
#: What each part's entry records, with its JSON type.
PART_FIELDS: dict[str, type | tuple[type, ...]] = {
    "store": str,
    "generation": str,
    "content_sha256": str,
    "record_digest": (str, type(None)),
    "num_samples": int,
    "dataset_indices_sha256": str,
}


def is_joined(attributes: dict[str, Any]) -> bool:
    """Whether a Zarr group's attributes are those of a joined store."""
    return JOINED_KEY in attributes


def read_joined_record(attributes: dict[str, Any], where: str) -> dict[str, Any]:
    """The joined store's record, checked for the fields and types kdcache writes."""
    record = attributes.get(JOINED_KEY)

    def refuse(problem: str) -> StoreFormatError:
        return StoreFormatError(
            f"{where} is a joined store with an unreadable record ({problem}); write it again "
            "with `kdcache concat PARTS --out STORE --link --overwrite`"
        )

    if not isinstance(record, dict):
        raise refuse(f"{JOINED_KEY!r} holds {type(record).__name__}, not an object")
    version = record.get("format")
    if version != JOINED_FORMAT:
        raise refuse(f"format {version!r}; this kdcache reads format {JOINED_FORMAT}")
    for key in ("generation", "created_at", "kdcache_version"):
        if not isinstance(record.get(key), str):
            raise refuse(f"{key} is {record.get(key)!r}")
    parts = record.get("parts")
    if not isinstance(parts, list) or len(parts) < 2:
        raise refuse(f"parts is {parts!r}, not a list of two or more stores")
    for number, part in enumerate(parts):
        if not isinstance(part, dict):
            raise refuse(f"part {number} is {part!r}")
        for key, kind in PART_FIELDS.items():
            value = part.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise refuse(f"part {number}'s {key} is {value!r}")
    return record


def whole_dataset(dataset: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record of the whole dataset a part was taken from (``subset_of``, as deep as it
    goes), or the part's own record when it names none."""
    while isinstance(dataset, dict) and isinstance(dataset.get("subset_of"), dict):
        dataset = dataset["subset_of"]
    return dataset


def part_identity(metadata: StoreMetadata, encoding: str) -> dict[str, Any]:
    """What parts of one dump share (``encoding`` parsed: a dump records it as typed,
    e.g. ``viewset:16:4``, convert by its name)."""
    return {
        "teacher": metadata.teacher,
        "encoding": encoding,
        "classes": metadata.num_classes,
        "views": metadata.views,
        "augmentation": metadata.augment,
        "dataset": whole_dataset(metadata.dataset),
    }


def refuse_different_parts(
    first: dict[str, Any], other: dict[str, Any], first_name: str, other_name: str, tool: str
) -> None:
    """Refuse two parts whose identities (:func:`part_identity`, and more) differ, naming the
    first field that does."""
    for field, value in first.items():
        if other[field] != value:
            raise StoreMismatchError(
                f"{other_name} and {first_name} differ in their {field} ({other[field]!r} vs "
                f"{value!r}); {tool} joins parts of one dump: same teacher, encoding, classes, "
                "views and dataset"
            )


def whole_size(dataset: dict[str, Any] | None, *, tokens: bool = False) -> int | None:
    """Samples (sequences of a token store) of the whole dataset, as its fingerprint says."""
    fingerprint = (dataset or {}).get("fingerprint") or {}
    if tokens:
        fingerprint = fingerprint.get("tokens") or {}
    count = fingerprint.get("num_samples")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def sample_owners(
    indices: Sequence[np.ndarray], names: Sequence[str], size: int | None
) -> np.ndarray:
    """Which part holds each sample of the whole dataset (``size`` samples, or the largest
    index held + 1), refusing a sample held by two parts or by none, and indices beyond it."""
    everything = np.concatenate(list(indices))
    size = int(everything.max()) + 1 if size is None else size
    if everything.max() >= size:
        outside = np.unique(everything[everything >= size])
        raise StoreMismatchError(
            f"the stores hold samples {row_ranges(outside)} beyond the dataset's {size} samples "
            "(its fingerprint's num_samples); they are not parts of that dataset"
        )
    owner = np.full(size, -1, dtype=np.int64)
    for number, (held_here, name) in enumerate(zip(indices, names, strict=True)):
        held = owner[held_here]
        twice = held_here[held >= 0]
        if twice.size:
            earlier = names[int(held[held >= 0][0])]
            raise StoreMismatchError(
                f"{name} and {earlier} both hold samples {row_ranges(np.unique(twice))}; "
                "parts must not overlap: convert one of them again without those indices"
            )
        owner[held_here] = number
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise StoreMismatchError(
            f"no store holds samples {row_ranges(missing)} of the dataset's {size}; add the part "
            "that holds them (parts are joined into a whole dataset, without gaps)"
        )
    return owner


def common_extra(extras: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``extra`` notes every part records alike (each part's provenance differs)."""
    first = extras[0]
    return {
        key: value
        for key, value in first.items()
        if all(key in extra and extra[key] == value for extra in extras[1:])
    }


class JoinedFeed(Feed):
    """The logit feed of a joined store: each row gathered from the feed of the part that holds
    it. Each part keeps its own table (in memory or chunk by chunk, within its share of the
    budget); a chunked epoch order is a random merge of the parts' own orders, so each part
    still decodes each of its chunks once per epoch."""

    def __init__(
        self,
        reader: RowSource,
        parts: Sequence[Feed],
        part_indices: Sequence[np.ndarray],
        *,
        memory_budget: int,
    ) -> None:
        super().__init__(reader)
        self.parts = list(parts)
        self.views = reader.metadata.views
        self.part_indices = [np.asarray(held, dtype=np.int64) for held in part_indices]
        samples = reader.metadata.num_samples
        self._owner = np.empty(samples, dtype=np.int64)
        self._local = np.empty(samples, dtype=np.int64)
        for number, held in enumerate(self.part_indices):
            self._owner[held] = number
            self._local[held] = np.arange(held.size)
        self.num_samples = reader.metadata.num_rows
        self.memory_budget = memory_budget

    @property
    def mode(self) -> str:
        """``"memory"`` when every part is decoded whole, else ``"chunked"``."""
        return "memory" if all(part.mode == "memory" for part in self.parts) else "chunked"

    @property
    def resident_nbytes(self) -> int:
        return sum(part.resident_nbytes for part in self.parts)

    @property
    def chunks_decoded(self) -> int:
        return sum(part.chunks_decoded for part in self.parts)

    def load(self, *, shared: bool = False) -> None:
        for part in self.parts:
            part.load(shared=shared)

    def gather(self, indices: Sequence[int] | np.ndarray | Any) -> dict[str, np.ndarray]:
        rows = self._rows(indices)
        samples, views = np.divmod(rows, self.views)
        owners = self._owner[samples]
        local = self._local[samples] * self.views + views
        gathered: dict[str, np.ndarray] = {}
        for number in np.unique(owners).tolist() or [0]:
            chosen = np.flatnonzero(owners == number)
            rows_there = self.parts[number].gather(local[chosen])
            for name, values in rows_there.items():
                if name not in gathered:
                    gathered[name] = np.empty((rows.size, *values.shape[1:]), dtype=values.dtype)
                gathered[name][chosen] = values
        return gathered

    def epoch_order(
        self, epoch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """As :meth:`Feed.epoch_order`. In memory the same permutation a store of the whole
        dataset gives; chunked, each part's chunk-aware order (its rank's share), merged at
        random so that every batch mixes the parts."""
        rng = np.random.default_rng([seed, epoch])
        if self.mode == "memory":
            return np.array_split(rng.permutation(self.num_samples), world_size)[rank]
        orders = []
        for number, (part, held) in enumerate(zip(self.parts, self.part_indices, strict=True)):
            local = part.epoch_order(
                epoch, seed=seed * len(self.parts) + number, rank=rank, world_size=world_size
            )
            orders.append(held[local // self.views] * self.views + local % self.views)
        source = rng.permutation(np.repeat(np.arange(len(orders)), [o.size for o in orders]))
        merged = np.empty(source.size, dtype=np.int64)
        for number, order in enumerate(orders):
            merged[source == number] = order
        return merged
