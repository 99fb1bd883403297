"""Bring your own training loop: any map-style dataset paired with the rows a store holds for it.

:class:`TeacherLogits` yields ``(x, y, teacher)``; its :meth:`~TeacherLogits.collate` (or
:meth:`~TeacherLogits.loader`, which keeps the store out of DataLoader workers) batches them, and
every batch's teacher rows come from one store read, as in ``kdcache distill``. ``teacher`` is in
the form the losses take: dense float32 logits, or :class:`~kdcache.logits.sparse.SparseLogits`
for a ``topk:K`` store, softened by the loss at its own temperature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from kdcache.augment.views import ViewSource
from kdcache.data.datasets import LabeledDataset, compare_fingerprints, dataset_fingerprint
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.sparse import SparseLogits, TeacherInput
from kdcache.store.format.layout import StoreLike
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.train.views import stored_view_source


def _describe(dataset: Any) -> str:
    if isinstance(dataset, LabeledDataset):
        return f"dataset {dataset.spec!r} ({dataset.split})"
    return f"the {type(dataset).__name__} given"


def _known_labels(dataset: Any) -> np.ndarray | None:
    """All N labels when the dataset exposes them (``labels``, or torchvision's ``targets``)."""
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64)
    return None


def _fingerprint(dataset: Any, recorded: dict[str, Any], *, check_inputs: bool) -> dict[str, Any]:
    """The parts of a dataset's fingerprint comparable with the one a store recorded."""
    if isinstance(dataset, LabeledDataset) and check_inputs:
        return dataset_fingerprint(dataset)
    actual: dict[str, Any] = {"num_samples": len(dataset)}
    if getattr(dataset, "num_classes", None) is not None:
        actual["num_classes"] = int(dataset.num_classes)
    labels = _known_labels(dataset)
    if labels is not None:
        actual["labels_sha256"] = hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest()
    indices = recorded.get("input_indices")
    if check_inputs and indices is not None and all(0 <= i < len(dataset) for i in indices):
        inputs = hashlib.sha256()
        for i in indices:
            x = dataset[i][0]
            x = x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else x
            inputs.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
        actual.update(inputs_sha256=inputs.hexdigest(), input_indices=list(indices))
    return actual


def check_store_matches(reader: StoreReader, dataset: Any, *, check_inputs: bool = True) -> None:
    """Refuse a store that was not dumped from ``dataset``: its size, its classes and the
    fingerprint the dump recorded (labels, and inputs hashed at a few indices).

    ``dataset`` is any map-style dataset of ``(x, y)``; what it does not expose (``num_classes``,
    ``labels`` or ``targets``) is not compared. ``check_inputs=False`` skips the inputs, for a
    dataset whose transforms are random (the store then holds the logits of other views).
    """
    where, described = reader.where, _describe(dataset)
    if reader.num_samples != len(dataset):
        raise StoreMismatchError(
            f"{where} holds {reader.num_samples} samples but {described} has {len(dataset)}; "
            "use the dataset and split the store was dumped from"
        )
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and reader.num_classes != num_classes:
        raise StoreMismatchError(
            f"{where} holds {reader.num_classes} classes but {described} has {num_classes}; "
            "use the dataset the store was dumped from"
        )
    recorded = (reader.metadata.dataset or {}).get("fingerprint")
    if recorded:
        differences = compare_fingerprints(
            recorded, _fingerprint(dataset, recorded, check_inputs=check_inputs)
        )
        if differences:
            hint = (
                ""
                if isinstance(dataset, LabeledDataset)
                else " (random transforms change the inputs: pass check_inputs=False)"
            )
            raise StoreMismatchError(
                f"{where} was not dumped from {described}: {'; '.join(differences)}; use the "
                f"dataset and split the store was dumped from{hint}"
            )
    stored, labels = reader.labels, _known_labels(dataset)
    if stored is not None and labels is not None:  # compared whenever present, fingerprint or not
        labelled = labels >= 0  # an unlabeled transfer pool (label -1) has nothing to compare
        differ = np.flatnonzero(labelled & (stored != labels))
        if differ.size:
            first = differ[0]
            raise StoreMismatchError(
                f"{where} holds other labels than {described} for {differ.size} samples, e.g. "
                f"sample {first} (store {stored[first]}, dataset {labels[first]}); use the dataset "
                "and split the store was dumped from"
            )


def _batch_teachers(teachers: Sequence[TeacherInput]) -> TeacherInput:
    if isinstance(teachers[0], SparseLogits):
        return SparseLogits.cat(teachers)  # type: ignore[arg-type]
    return torch.stack(teachers)  # type: ignore[arg-type]


class _Batch(list):
    """Items of one batch, with the batch's teacher rows as one read (``teacher``)."""

    teacher: TeacherInput


class TeacherLogits(Dataset):
    """``dataset`` paired with the teacher rows ``store`` holds for it, by sample index.

    Item ``i`` is ``(x, y, teacher)`` for sample ``indices[i]`` of ``dataset`` (sample ``i`` when
    ``indices`` is None); ``teacher`` is a (C,) float32 tensor, or a one-row
    :class:`~kdcache.logits.sparse.SparseLogits` for a ``topk:K`` store. Give :meth:`collate` to
    your DataLoader: a batch's teacher rows are then read from the store in one gather
    (``(B, C)`` tensor or ``SparseLogits``), ready for any kdcache loss at any temperature.

    A store dumped with ``--augment`` (and ``--views V``) holds the teacher's logits on augmented
    views: each item is then one view, item ``i * V + v`` being view ``v`` of the ``i``-th
    sample, its input recreated from the stored view parameters as ``kdcache distill`` does, and
    ``y`` the sample's own label (for a mixing recipe, :attr:`views` ``.mix_of(rows)`` gives each
    row's partner and own-pixel share).

    ``store`` is a path, URL, ``.zip`` or an open :class:`~kdcache.store.read.reader.StoreReader`
    (``memory_budget`` as in :func:`~kdcache.store.read.reader.open_store`). The store must have
    been dumped from ``dataset``: its size, classes and recorded fingerprint are checked as
    ``kdcache distill`` checks them (``check_inputs=False`` skips hashing inputs, for random
    transforms).
    """

    def __init__(
        self,
        dataset: Dataset,
        store: StoreLike | StoreReader,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        memory_budget: int | str | None = None,
        check_inputs: bool = True,
    ) -> None:
        self.dataset = dataset
        self.store = (
            store
            if isinstance(store, StoreReader)
            else open_store(store, memory_budget=memory_budget)
        )
        check_store_matches(self.store, dataset, check_inputs=check_inputs)
        self.indices = None if indices is None else self._checked(indices)
        #: The stored views' inputs (``None`` for a store of clean inputs).
        self.views = stored_view_source(self.store, dataset, described=_describe(dataset))  # type: ignore[arg-type]
        self.inputs = _Inputs(dataset, self.indices, self.views, self.store.views)

    def _checked(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(indices)
        n = self.store.num_samples
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise ConfigError(f"indices must be a 1-D sequence of integers, got {indices!r}")
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ConfigError(
                f"indices must lie in [0, {n}) for {self.store.where}, got {rows.min()} to "
                f"{rows.max()}"
            )
        return rows.astype(np.int64)

    def __len__(self) -> int:
        return len(self.inputs)

    def sample_index(self, position: int) -> int:
        """The dataset index of item ``position``."""
        return self.inputs.row(position) // self.inputs.views_per_sample

    def __getitem__(self, position: int) -> tuple[Any, Any, TeacherInput]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Any, Any, TeacherInput]]:
        """A batch of items with one store read for all their rows (DataLoader calls this)."""
        items = [self.inputs[int(position)] for position in positions]
        teacher = self.store.read([row for _, _, row in items])
        per_row = teacher.rows() if isinstance(teacher, SparseLogits) else teacher.unbind(0)
        batch = _Batch(
            (x, y, row_teacher) for (x, y, _), row_teacher in zip(items, per_row, strict=True)
        )
        batch.teacher = teacher
        return batch

    @staticmethod
    def collate(items: Sequence[tuple[Any, Any, TeacherInput]]) -> tuple[Any, Any, TeacherInput]:
        """``collate_fn`` for a DataLoader over :class:`TeacherLogits`: inputs and labels as the
        default collate stacks them, teacher rows as one (B, C) tensor or ``SparseLogits``."""
        inputs, labels, teachers = zip(*items, strict=True)
        # a batch from __getitems__ already holds its rows as read, in order
        teacher = items.teacher if isinstance(items, _Batch) else _batch_teachers(teachers)
        return default_collate(list(inputs)), default_collate(list(labels)), teacher

    def loader(self, **options: Any) -> PairedLoader:
        """Batches ``(x, y, teacher)`` from a DataLoader built with ``options`` (batch_size,
        shuffle, num_workers, ...), whose workers load only ``(x, y)``: the teacher rows of each
        batch are gathered in this process, in one read, so workers never open the store."""
        return PairedLoader(self, **options)


class _Inputs(Dataset):
    """``(x, y, store row)`` of each item of a :class:`TeacherLogits`, without its store (for
    workers): the sample's input, or the stored view's, recreated."""

    def __init__(
        self,
        dataset: Any,
        indices: np.ndarray | None,
        views: ViewSource | None,
        views_per_sample: int,
    ) -> None:
        self.dataset, self.indices, self.views = dataset, indices, views
        self.views_per_sample = views_per_sample

    def __len__(self) -> int:
        samples = len(self.dataset) if self.indices is None else len(self.indices)
        return samples * self.views_per_sample

    def row(self, position: int) -> int:
        """The store row of item ``position``: ``sample * V + view``."""
        item, view = divmod(int(position), self.views_per_sample)
        sample = item if self.indices is None else int(self.indices[item])
        return sample * self.views_per_sample + view

    def __getitem__(self, position: int) -> tuple[Any, Any, int]:
        row = self.row(position)
        sample, view = divmod(row, self.views_per_sample)
        x, y = self.dataset[sample]
        if self.views is not None:
            x = self.views.view(sample, view, x)
        return x, y, row


class PairedLoader:
    """Iterates ``(x, y, teacher)`` batches; see :meth:`TeacherLogits.loader`."""

    def __init__(self, pairs: TeacherLogits, **options: Any) -> None:
        self.store = pairs.store
        self.loader = DataLoader(pairs.inputs, **options)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any, TeacherInput]]:
        for inputs, labels, rows in self.loader:
            yield inputs, labels, self.store.read(rows)
