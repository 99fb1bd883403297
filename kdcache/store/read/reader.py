"""Read-only access to a kdcache logit store: metadata, labels and logits gathered by index.

Every read is by row: the sample index, or ``sample * views + view`` in a store with views
(:meth:`StoreReader.read_views` gathers all views of some samples with their parameters).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr

from kdcache.errors import (
    ConfigError,
    KdcacheError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
)
from kdcache.logits.encodings import parse_encoding
from kdcache.logits.sparse import SparseLogits, TeacherInput
from kdcache.store.format.digests import DIGESTS_ARRAY
from kdcache.store.format.layout import (
    DATASET_INDICES_ARRAY,
    LABELS_ARRAY,
    SEQUENCE_KEY,
    VIEW_PARAMS_ARRAY,
    StoreLike,
    first_line,
    has_array,
    missing_chunks,
    open_group,
    read_metadata,
    row_ranges,
)
from kdcache.store.format.location import StoreLocation, parse_location
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.read.chunk_files import ChunkFileReader
from kdcache.store.read.decoding import default_decode_threads
from kdcache.store.read.feed import Feed, default_memory_budget, parse_size
from kdcache.store.read.guard import DECODE_ERRORS, ChunkGuard, decode_rows
from kdcache.store.read.joined import (
    JOINED_FROM_KEY,
    JoinedFeed,
    common_extra,
    is_joined,
    part_identity,
    read_joined_record,
    refuse_different_parts,
    sample_owners,
    whole_dataset,
    whole_size,
)
from kdcache.store.read.logit_feed import LogitFeed
from kdcache.wording import counted

__all__ = [
    "JoinedReader",
    "StoreReader",
    "open_store",
    "recorded_class_names",
]


class StoreReader:
    """Read-only access to a store; :meth:`read` gathers rows through its :class:`Feed`."""

    def __init__(
        self,
        group: zarr.Group,
        metadata: StoreMetadata,
        where: str,
        *,
        location: StoreLocation | None = None,
        memory_budget: int | str | None = None,
    ) -> None:
        self._opened: zarr.Group | None = group
        self._location = location
        self._pid: int | None = os.getpid()
        self.where = where
        self.metadata = metadata
        self.encoding = parse_encoding(metadata.encoding, num_classes=metadata.num_classes)
        self._memory_budget = None if memory_budget is None else parse_size(memory_budget)
        self._feed: Feed | None = None
        layout = self.encoding.layout(metadata.num_classes)
        #: The checks every decoded chunk passes (kdcache.store.read.guard).
        self.guard = ChunkGuard(metadata, layout, where, lambda: self._group)
        self._view_params: np.ndarray | None = None
        #: Per array, its chunk files' reader, ``None`` where zarr's path is kept.
        self._chunk_files: dict[str, ChunkFileReader | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles are reopened where the reader lands; the feed travels without its table.
        return {
            **self.__dict__,
            "_opened": None,
            "_pid": None,
            "guard": None,
            "_chunk_files": {},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        layout = self.encoding.layout(self.metadata.num_classes)
        self.guard = ChunkGuard(self.metadata, layout, self.where, lambda: self._group)

    @property
    def num_samples(self) -> int:
        return self.metadata.num_samples

    @property
    def num_classes(self) -> int:
        return self.metadata.num_classes

    @property
    def views(self) -> int:
        """V, the views stored per sample (1 for a store of clean inputs)."""
        return self.metadata.views

    @property
    def num_rows(self) -> int:
        return self.metadata.num_rows

    @property
    def _unit(self) -> str:
        # Row indices name samples, or ``sample * V + view`` rows in a store with views.
        return "samples" if self.views == 1 else "rows"

    @property
    def view_params(self) -> np.ndarray | None:
        """``(N, V, P)`` float32 parameters of every view (``None`` without them), read once."""
        if self._view_params is None and has_array(self._group, VIEW_PARAMS_ARRAY):
            params = np.asarray(self.guard.whole(VIEW_PARAMS_ARRAY), dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(params.reshape(len(params), -1)).all(axis=1))
            if bad.size:
                raise StoreCorruptError(
                    f"{self.where}: array {VIEW_PARAMS_ARRAY!r} holds NaN or Inf for samples "
                    f"{row_ranges(bad)} (kdcache never writes them: the store was altered); run "
                    "`kdcache verify` and dump again"
                )
            self._view_params = params
        return self._view_params

    @property
    def class_names(self) -> list[str] | None:
        """The name of each class the dataset records (image-folder classes), else ``None``."""
        return recorded_class_names(self.metadata.dataset, self.num_classes)

    @property
    def labels(self) -> np.ndarray | None:
        """The stored labels (``None`` when the store has none), checked to lie in [0, C)."""
        if not has_array(self._group, LABELS_ARRAY):
            return None
        labels = np.asarray(self.guard.whole(LABELS_ARRAY), dtype=np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            raise StoreCorruptError(
                f"{self.where}: stored labels lie outside [0, {self.num_classes}) for samples "
                f"{row_ranges(bad)}; run `kdcache verify` and dump again"
            )
        return labels

    @property
    def _group(self) -> zarr.Group:
        # fsspec clients and zip handles break when shared across fork: reopen per process.
        if self._location is not None and os.getpid() != self._pid:
            self._opened, self._pid = open_group(self._location), os.getpid()
        assert self._opened is not None, "a StoreReader without a location cannot be pickled"
        return self._opened

    @property
    def feed(self) -> Feed:
        """The in-memory or chunked logit feed behind :meth:`read`, built on first use."""
        if self._feed is None:
            self._feed = LogitFeed(
                self,
                memory_budget=self._memory_budget,
                decode_threads=default_decode_threads(remote=self.remote),
            )
        return self._feed

    @property
    def remote(self) -> bool:
        """Whether the store is reached over the network (a URL such as ``s3://...``)."""
        return self._location is not None and self._location.kind == "remote"

    @property
    def group(self) -> zarr.Group:
        """The store's read-only Zarr group, for tools that inspect the raw arrays."""
        return self._group

    def written_fraction(self) -> float:
        return float(self.guard.written().mean())

    def progress(self) -> str:
        """How far the dump got, e.g. ``1 of 3 chunks (10 of 30 samples, 33%)``."""
        written = self.guard.written()
        rows = self.metadata.rows_of_chunks(np.flatnonzero(written)).size
        return (
            f"{int(written.sum())} of {counted(written.size, 'chunk')} ({rows} of {self.num_rows} "
            f"{self._unit}, {written.mean():.0%})"
        )

    def load(self) -> None:
        """Decode the whole store into memory now when it fits the memory budget (idempotent)."""
        self.feed.load()

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (whole chunks) of the stored array ``name``, checked by the guard:
        a corrupted, misplaced or non-finite chunk stops the read, naming its samples."""
        array = self.guard.array(name)
        values = decode_rows(array, start, stop, self.where, self.metadata.chunk_rows)
        self.guard.check_rows(name, start, values)
        return values

    def read_rows_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """:meth:`read_rows` decoded into ``out`` (``stop - start`` rows, C-contiguous); from a
        local store's chunk files without a new buffer per chunk (kdcache.store.read.chunk_files).
        """
        array = self.guard.array(name)
        if name not in self._chunk_files:
            self._chunk_files[name] = ChunkFileReader.for_array(array)
        files = self._chunk_files[name]
        chunk_rows = self.metadata.chunk_rows
        spans = [(low, min(low + chunk_rows, stop)) for low in range(start, stop, chunk_rows)]
        if files is None or not all(
            files.decode_into(low // chunk_rows, out[low - start : high - start])
            for low, high in spans
        ):
            out[...] = decode_rows(array, start, stop, self.where, chunk_rows)
        self.guard.check_rows(name, start, out)

    def check_chunks_present(self, name: str) -> None:
        """Refuse an array whose written chunks were deleted (zarr would read them as fill
        values), or whose metadata departs from what the store created."""
        array = self.guard.array(name)
        missing = missing_chunks(array, np.arange(self.metadata.num_chunks))
        if missing.size:
            lost = self.metadata.rows_of_chunks(missing)
            raise StoreCorruptError(
                f"{self.where}: array {name!r} lacks the chunks for {self._unit} "
                f"{row_ranges(lost)} "
                "(deleted or lost in a copy); run `kdcache verify` and dump again"
            )

    def check_unchanged(self) -> None:
        """Stop if the store was overwritten since it was opened (see kdcache.store.read.guard)."""
        self.guard.check_unchanged()

    def content_digest(self) -> str:
        """sha256 of the store's chunk digest table, which changes whenever any chunk's values
        do; empty for stores written before digests existed."""
        if not self.metadata.digests:
            return ""
        try:
            table = np.ascontiguousarray(self.guard.array(DIGESTS_ARRAY)[:])
        except DECODE_ERRORS as error:
            raise StoreCorruptError(
                f"{self.where}: the digest table {DIGESTS_ARRAY!r} does not decode "
                f"({first_line(error)}); run `kdcache verify` and dump again"
            ) from None
        return hashlib.sha256(table.data).hexdigest()

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TeacherInput:
        """The rows of the given sample indices in the form every loss takes, right at any T.

        Dense float32 logits ``(B, C)`` for the float32, float16 and int8 encodings;
        :class:`~kdcache.logits.sparse.SparseLogits` for a ``topk:K`` store, which the losses
        soften at their own temperature (its dense form depends on T: see :meth:`read_dense`).
        """
        return self.feed.read(indices)

    def read_dense(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Dense float32 logits ``(B, C)`` for the given rows (sample indices when V = 1).

        A ``topk:K`` store requires ``temperature``: its tail is filled so that the softmax at
        that temperature gives the tail its true total mass (pass the T you soften at). The other
        encodings ignore it.
        """
        if temperature is None and self.encoding.is_sparse:
            raise ConfigError(
                f"{self.where} is a {self.metadata.encoding} store, whose dense rows depend on the "
                "temperature they are softened at: call read_dense(indices, temperature=T), or "
                "read(indices), whose sparse rows every loss softens at its own temperature"
            )
        return self.feed.read_dense(indices, temperature=temperature)

    def read_views(
        self,
        samples: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        temperature: float | None = None,
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Every view of the given samples: dense float32 logits ``(B, V, C)`` and the views'
        parameters ``(B, V, P)`` (``None`` for a store without them)."""
        if isinstance(samples, torch.Tensor):
            samples = samples.cpu().numpy()
        chosen = np.asarray(samples, dtype=np.int64).reshape(-1)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= self.num_samples):
            raise ConfigError(
                f"sample indices must lie in [0, {self.num_samples}), got {chosen.min()} to "
                f"{chosen.max()}; {self.where} holds {self.num_samples} samples"
            )
        rows = (chosen[:, None] * self.views + np.arange(self.views)).reshape(-1)
        logits = self.read_dense(rows, temperature=temperature)
        logits = logits.reshape(chosen.size, self.views, -1)
        params = self.view_params
        return logits, None if params is None else params[chosen]

    def read_sparse(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> SparseLogits:
        """The rows of a ``topk:K`` store in sparse form, never as a dense (B, C) tensor."""
        sparse = self.encoding.sparse(self._gather(indices))
        if sparse is None:
            raise ConfigError(
                f"{self.where} uses the dense encoding {self.metadata.encoding!r}; read_sparse "
                "needs a topk:K store: use read() or read_dense() instead"
            )
        return sparse

    def _gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        return self.feed.gather(indices)


def recorded_class_names(dataset: dict[str, Any] | None, num_classes: int) -> list[str] | None:
    """The class names a store's ``dataset`` record holds (stores written before kdcache
    recorded them, and datasets without names, have none)."""
    names = (dataset or {}).get("class_names")
    if (
        isinstance(names, list)
        and len(names) == num_classes
        and all(isinstance(name, str) for name in names)
    ):
        return names
    return None


def open_store(
    path: StoreLike, *, allow_incomplete: bool = False, memory_budget: int | str | None = None
) -> StoreReader:
    """Open a store (folder, URL or .zip) read-only; refuses an incomplete one unless
    ``allow_incomplete``, and (unless ``allow_incomplete``) one whose arrays depart from what it
    created (kdcache.store.read.guard).

    ``memory_budget`` (bytes or a size such as ``"8GiB"``; default half the available memory)
    bounds the decoded logits :meth:`StoreReader.read` keeps in RAM, see
    :mod:`kdcache.store.read.feed`.
    """
    location = parse_location(path)
    where = location.text
    group = open_group(location)
    if is_joined(group.attrs.asdict()):
        return JoinedReader.open(group, location, memory_budget=memory_budget)
    metadata = read_metadata(group, where)
    reader = StoreReader(group, metadata, where, location=location, memory_budget=memory_budget)
    if not metadata.complete and not allow_incomplete:
        raise StoreIncompleteError(
            f"{where} is an unfinished dump ({reader.progress()} written); finish it with "
            "`kdcache dump-teacher --resume` (same options) before using it"
        )
    if not allow_incomplete:
        reader.guard.check_all_arrays()
    return reader


class JoinedReader(StoreReader):
    """Stores of disjoint parts of one dataset read in place as one store of the whole dataset
    (a joined store, written by ``kdcache concat PARTS --out J --link``; see
    :mod:`kdcache.store.read.joined`). Sample i is sample i of the dataset, read from the part
    that holds it; :attr:`parts` are the parts' own readers, in the recorded order."""

    def __init__(
        self,
        group: zarr.Group,
        metadata: StoreMetadata,
        where: str,
        *,
        location: StoreLocation,
        parts: list[StoreReader],
        part_indices: list[np.ndarray],
        memory_budget: int,
    ) -> None:
        super().__init__(group, metadata, where, location=location, memory_budget=memory_budget)
        self.parts = parts
        self.part_indices = part_indices

    @classmethod
    def open(
        cls, group: zarr.Group, location: StoreLocation, *, memory_budget: int | str | None
    ) -> JoinedReader:
        """Open every part the joined store at ``location`` names; refuse a part that cannot
        be opened, changed since it was joined, or does not make one dataset with the others."""
        where = location.text
        record = read_joined_record(group.attrs.asdict(), where)
        entries = record["parts"]
        budget = default_memory_budget() if memory_budget is None else parse_size(memory_budget)
        total = sum(entry["num_samples"] for entry in entries)
        parts = [
            _open_part(
                entry, location, memory_budget=max(1, budget * entry["num_samples"] // total)
            )
            for entry in entries
        ]
        indices = [
            _part_indices(part, entry, where) for part, entry in zip(parts, entries, strict=True)
        ]
        first = parts[0]
        identities = [part_identity(part.metadata, part.encoding.name) for part in parts]
        for part, identity in zip(parts[1:], identities[1:], strict=True):
            refuse_different_parts(
                identities[0], identity, first.where, part.where, "a joined store"
            )
        dataset = whole_dataset(first.metadata.dataset)
        sample_owners(indices, [part.where for part in parts], whole_size(dataset))
        samples = sum(held.size for held in indices)
        extra = common_extra([part.metadata.extra for part in parts])
        extra[JOINED_FROM_KEY] = [
            {**entry, "fidelity": part.metadata.fidelity}
            for entry, part in zip(entries, parts, strict=True)
        ]
        metadata = StoreMetadata(
            num_samples=samples,
            num_classes=first.num_classes,
            encoding=first.metadata.encoding,
            chunk_rows=first.metadata.chunk_rows,
            format_version=first.metadata.format_version,
            teacher=first.metadata.teacher,
            dataset=dataset,
            kdcache_version=record["kdcache_version"],
            created_at=record["created_at"],
            complete=True,
            extra=extra,
            generation=record["generation"],
            views=first.views,
            augment=first.metadata.augment,
        )
        return cls(
            group,
            metadata,
            where,
            location=location,
            parts=parts,
            part_indices=indices,
            memory_budget=budget,
        )

    @property
    def feed(self) -> Feed:
        if self._feed is None:
            assert self._memory_budget is not None
            self._feed = JoinedFeed(
                self,
                [part.feed for part in self.parts],
                self.part_indices,
                memory_budget=self._memory_budget,
            )
        return self._feed

    @property
    def labels(self) -> np.ndarray | None:
        """Every part's labels in their samples' places (``None`` when a part has none)."""
        joined = np.zeros(self.num_samples, dtype=np.int64)
        for part, indices in zip(self.parts, self.part_indices, strict=True):
            labels = part.labels
            if labels is None:
                return None
            joined[indices] = labels
        return joined

    @property
    def view_params(self) -> np.ndarray | None:
        """Every part's view parameters in their samples' places (``None`` without views)."""
        held = [part.view_params for part in self.parts]
        if self._view_params is None and held[0] is not None:
            params = np.zeros((self.num_samples, *held[0].shape[1:]), dtype=np.float32)
            for part_params, indices in zip(held, self.part_indices, strict=True):
                params[indices] = part_params
            self._view_params = params
        return self._view_params

    def written_fraction(self) -> float:
        return 1.0

    def progress(self) -> str:
        return f"complete: {len(self.parts)} parts, every one complete"

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.feed.gather(np.arange(start, stop))[name]

    def read_rows_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self.read_rows(name, start, stop)

    def check_chunks_present(self, name: str) -> None:
        for part in self.parts:
            part.check_chunks_present(name)

    def check_unchanged(self) -> None:
        for part in self.parts:
            part.check_unchanged()

    def content_digest(self) -> str:
        """sha256 over the parts' content digests and which samples each holds."""
        digest = hashlib.sha256(b"kdcache-joined")
        for entry in self.metadata.extra[JOINED_FROM_KEY]:
            digest.update(f"{entry['content_sha256']}:{entry['dataset_indices_sha256']}".encode())
        return digest.hexdigest()


def _open_part(
    entry: dict[str, Any], location: StoreLocation, *, memory_budget: int
) -> StoreReader:
    """The part ``entry`` names, refused unless it is the store that was joined. A relative
    path is relative to the joined store's folder (older joined stores hold absolute ones)."""
    where, store = location.text, entry["store"]
    folder = location.resolved().folder
    if folder is not None and parse_location(store).kind != "remote":
        store = os.path.normpath(os.path.join(folder, store))  # an absolute one is kept
    try:
        part = open_store(store, memory_budget=memory_budget)
    except KdcacheError as error:
        raise type(error)(f"{where} joins a part that cannot be read: {error}") from None
    if isinstance(part, JoinedReader) or SEQUENCE_KEY in part.metadata.extra:
        raise StoreMismatchError(
            f"{where} joins {part.where}, which is not a store of image rows (a joined or token "
            "store); join the parts themselves"
        )
    found = {
        "generation": part.metadata.generation,
        "content_sha256": part.content_digest(),
        "record_digest": (part.metadata.digests or {}).get("record"),
    }
    changed = [key for key, value in found.items() if entry[key] != value]
    if changed:
        raise StoreMismatchError(
            f"{where} joins {part.where}, which changed since it was joined (its {changed[0]} "
            f"differs: {found[changed[0]]!r}, recorded {entry[changed[0]]!r}); join the parts "
            "again with `kdcache concat PARTS --out STORE --link --overwrite`"
        )
    return part


def _part_indices(part: StoreReader, entry: dict[str, Any], where: str) -> np.ndarray:
    """The dataset samples ``part`` holds, as recorded when it was joined."""
    if not has_array(part.group, DATASET_INDICES_ARRAY):
        raise StoreMismatchError(
            f"{where} joins {part.where}, which records no {DATASET_INDICES_ARRAY!r}; join "
            "parts written by `kdcache convert --indices` or with that array"
        )
    indices = np.asarray(part.guard.whole(DATASET_INDICES_ARRAY), dtype=np.int64)
    found = hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()
    if found != entry["dataset_indices_sha256"] or indices.shape != (part.num_samples,):
        raise StoreMismatchError(
            f"{where} joins {part.where}, whose {DATASET_INDICES_ARRAY!r} changed since it was "
            "joined; join the parts again with `kdcache concat PARTS --out STORE --link "
            "--overwrite`"
        )
    return indices
