"""The inputs of stored views, recreated from their parameters on the dataset's clean inputs.

:class:`ViewSource` is the one place that turns a record of :class:`~kdcache.augment.recipe.Recipe`
parameters into an input tensor: the dump (:class:`AllViews`, every view of a sample from one
decode), the cached run and the online run (:class:`ViewDataset`, one view per store row) all
call it, so a stored view's logits always belong to exactly the pixels the student sees.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.augment.ops import Mix, Op, PixelScale, Size
from kdcache.augment.recipe import OPS_VERSION, SAMPLER, STUDENT_STREAM, Recipe, parse_recipe
from kdcache.errors import ConfigError, SpecError, StoreCorruptError, StoreMismatchError

log = logging.getLogger("kdcache")

#: The generator of stores whose ``augment`` record names none (kdcache before counter-v1 drew
#: each view from ``numpy.random.default_rng([seed, sample, view, stream])``).
LEGACY_SAMPLER = "numpy-default_rng"
#: View records range-checked at a time (:func:`check_view_records`).
CHECK_ROWS = 1 << 20


class BaseDataset(Protocol):
    """What views need of a dataset (a :class:`kdcache.data.datasets.LabeledDataset`)."""

    num_classes: int
    in_channels: int
    spec: str
    split: str

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


def input_size(dataset: BaseDataset) -> tuple[int, int]:
    """(H, W) of the dataset's inputs, read from sample 0."""
    image = dataset[0][0]
    return int(image.shape[-2]), int(image.shape[-1])


def augment_record(recipe: Recipe, *, seed: int, size: tuple[int, int]) -> dict[str, Any]:
    """What a store records about its views (``StoreMetadata.augment``), including the generator
    that drew their parameters (``sampler``): another generator draws other views."""
    record = {
        "recipe": recipe.spec,
        "seed": seed,
        "sampler": SAMPLER,
        "fields": list(recipe.fields),
        "input_size": list(size),
    }
    # Layout 1 is left unrecorded: such records equal those of stores written before layouts
    # were numbered, so those stores still resume.
    if recipe.ops_version > 1:
        record["ops_version"] = recipe.ops_version
    return record


def recorded_recipe(record: dict[str, Any], *, where: str) -> Recipe:
    """The recipe of a store's ``augment`` record, after checking that this kdcache reads its
    view-parameter layout (``ops_version``, 1 when absent) and that the recipe fits it."""
    version = record.get("ops_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreCorruptError(
            f"{where} records augment.ops_version = {version!r}, expected an integer from 1 to "
            f"{OPS_VERSION}; run kdcache verify and dump the store again"
        )
    if version > OPS_VERSION:
        raise StoreMismatchError(
            f"{where}'s views use view-parameter layout {version} but this kdcache reads up to "
            f"{OPS_VERSION}; upgrade kdcache (pip install -U kdcache)"
        )
    recipe = parse_recipe(str(record.get("recipe")))
    if recipe.ops_version > version:
        raise StoreCorruptError(
            f"{where}'s recipe {recipe.spec!r} needs view-parameter layout {recipe.ops_version} "
            f"but the store records layout {version}; run kdcache verify and dump the store again"
        )
    return recipe


def sampler_of(record: dict[str, Any]) -> str:
    """The generator that drew the views of a store's ``augment`` record."""
    return str(record.get("sampler") or LEGACY_SAMPLER)


def check_view_records(
    recipe: Recipe, params: np.ndarray, size: Size, *, described: str = "the view parameters"
) -> None:
    """Refuse records ``params`` ``(N, V, P)`` that ``recipe`` could not have drawn for inputs
    of ``size`` (a crop outside the image, a flip other than 0 or 1, lam outside [0, 1], a
    partner that is not another sample, pad offsets beyond the padding, a transform or magnitude
    its policy never picks, a jitter factor outside its range, ...: each operation's
    ``problems``), in one line naming the first such sample and view: replayed, they would show
    the student pixels no teacher saw."""
    num_samples, views, _ = params.shape
    records = params.reshape(num_samples * views, -1)
    # Each operation's block of fields, at the size its input has (partner blocks last).
    blocks: list[tuple[Op | Mix, Size]] = []
    current = size
    for image_op in recipe.image_ops:
        blocks.append((image_op, current))
        current = image_op.out_size(current)
    if recipe.mix is not None:
        blocks += [(recipe.mix, current), *blocks[: len(recipe.image_ops)]]
    for first in range(0, len(records), CHECK_ROWS):  # bounds the temporaries
        part = records[first : first + CHECK_ROWS]
        index = (first + np.arange(len(part))) // views
        position = 0
        for block, at in blocks:
            columns = part[:, position : position + len(block.fields)]
            problems = (
                block.problems(columns, at, index, num_samples)
                if isinstance(block, Mix)
                else block.problems(columns, at)
            )
            for bad, column, expected in problems:
                if bad.any():
                    row = int(np.flatnonzero(bad)[0])
                    sample, view = divmod(first + row, views)
                    raise StoreCorruptError(
                        f"{described}: view {view} of sample {sample} has "
                        f"{recipe.fields[position + column]} = {part[row, position + column]:g}, "
                        f"expected {expected} (recipe {recipe.spec!r} on {at[0]} x {at[1]} "
                        "inputs); kdcache never draws such a view, so the parameters were "
                        "altered: run `kdcache verify` and dump the store again"
                    )
            position += len(block.fields)


class ViewSource:
    """A dataset's views: ``recipe`` replayed from ``params`` ``(N, V, P)`` on its clean inputs,
    each record range-checked first (:func:`check_view_records`)."""

    def __init__(
        self,
        dataset: BaseDataset,
        recipe: Recipe,
        params: np.ndarray,
        *,
        described: str = "the view parameters",
    ) -> None:
        params = np.asarray(params, dtype=np.float32)
        if (
            params.ndim != 3
            or params.shape[0] != len(dataset)
            or params.shape[2] != len(recipe.fields)
        ):
            raise ConfigError(
                f"view parameters of shape {params.shape} do not fit {len(dataset)} samples of "
                f"recipe {recipe.spec!r} ({len(recipe.fields)} parameters per view)"
            )
        self.dataset = dataset
        self.recipe = recipe
        self.views = params.shape[1]
        self.size = input_size(dataset)
        self.scale = PixelScale.of(dataset)
        check_view_records(recipe, params, self.size, described=described)
        self.params = params

    @classmethod
    def drawn(cls, dataset: BaseDataset, recipe: Recipe, *, seed: int, views: int) -> ViewSource:
        """``views`` views of every sample, their parameters drawn by ``recipe`` from ``seed``
        for the dataset's input size: the views a dump, an online run and a benchmark share."""
        size = input_size(dataset)
        params = recipe.sample_table(seed=seed, num_samples=len(dataset), views=views, size=size)
        return cls(dataset, recipe, params)

    def _clean(self, index: int) -> torch.Tensor:
        image = self.dataset[index][0]
        if tuple(image.shape[-2:]) != self.size:
            raise SpecError(
                f"sample {index} of {self.dataset.spec!r} is {tuple(image.shape[-2:])} pixels but "
                f"the views were drawn for {self.size}; augmented views need inputs of one size"
            )
        return image

    def view(self, index: int, view: int, clean: torch.Tensor | None = None) -> torch.Tensor:
        """View ``view`` of sample ``index`` (pass ``clean``, its input, to skip a decode)."""
        record = self.params[index, view]
        image = self._clean(index) if clean is None else clean
        partner = self.recipe.partner(record)
        other = None if partner is None else self._clean(partner)
        return self.recipe.apply(image, record, other, scale=self.scale)

    def mix_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Partner sample and own-pixel share ``lam`` of each row; ``None`` without mixing."""
        if not self.recipe.mixes:
            return None
        records = self.params.reshape(-1, self.params.shape[2])[rows]
        start = self.recipe.mix_offset
        return records[:, start].astype(np.int64), records[:, start + 1]


class AllViews(Dataset):
    """Item i: every view of sample i ``(V, C, H, W)`` from one decode, its label and i."""

    def __init__(self, source: ViewSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        clean, label = self.source.dataset[index]
        views = [self.source.view(index, v, clean) for v in range(self.source.views)]
        return torch.stack(views), label, index


class ViewDataset(Dataset):
    """A training set of store rows: item ``sample * V + view`` is that view's input and label.

    ``source`` may be ``None`` for a store of clean inputs (one row per sample). ``student``, a
    recipe without mixing, adds student-only augmentation drawn per ``(student_seed, sample,
    epoch)``: the teacher never saw it, so it breaks teacher-student consistency; items are then
    indexed ``epoch * N * V + row`` (see :class:`~kdcache.augment.order.ViewSampler`).
    """

    #: What :class:`kdcache.data.device_input.InputPipeline` needs: views are float32 images.
    input_form = "float32"
    normalization = None
    jpeg_geometry = None

    def __init__(
        self,
        dataset: BaseDataset,
        source: ViewSource | None,
        *,
        student: Recipe | None = None,
        student_seed: int = 0,
    ) -> None:
        if student is not None and student.mixes:
            raise ConfigError(
                f"student-only augmentation {student.spec!r} cannot mix samples: the teacher's "
                "logits would not cover the partner; drop mixup/cutmix from it"
            )
        self.dataset = dataset
        self.source = source
        self.views = 1 if source is None else source.views
        self.student = student
        self.student_seed = student_seed
        self.num_classes = dataset.num_classes
        self.in_channels = dataset.in_channels
        self.spec = dataset.spec
        self.split = dataset.split
        self.num_rows = len(dataset) * self.views
        self.size = input_size(dataset) if source is None else source.size
        # What the student's augmentation gets: the stored views' size (or the clean inputs').
        self._student_size = self.size if source is None else source.recipe.out_size(self.size)
        self._scale = PixelScale.of(dataset)
        self._student_epoch: tuple[int, np.ndarray] | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, indices: torch.Tensor | np.ndarray) -> np.ndarray:
        """Store rows of the items ``indices`` (which carry the epoch with student augmentation)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        return np.asarray(indices, dtype=np.int64) % self.num_rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        epoch, row = divmod(int(index), self.num_rows)
        sample, view = divmod(row, self.views)
        clean, label = self.dataset[sample]
        image = clean if self.source is None else self.source.view(sample, view, clean)
        if self.student is not None:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            record = self._student_record(sample, epoch, size)
            image = self.student.apply(image, record, scale=self._scale)
        return image, label

    def _student_record(self, sample: int, epoch: int, size: tuple[int, int]) -> np.ndarray:
        """The student's record of ``sample`` in ``epoch``, view ``epoch`` of stream
        STUDENT_STREAM: drawn for every sample of the epoch at once (drawing one record costs
        ~100 µs of numpy calls, a row of a bulk table well under 1 µs); the same record either
        way, so an input of another size is simply drawn alone."""
        assert self.student is not None
        options = {"seed": self.student_seed, "num_samples": len(self.dataset)}
        if size != self._student_size:
            return self.student.sample(
                index=sample, view=epoch, size=size, stream=STUDENT_STREAM, **options
            )
        if self._student_epoch is None or self._student_epoch[0] != epoch:
            records = self.student.sample_view(
                view=epoch, size=size, stream=STUDENT_STREAM, **options
            )
            self._student_epoch = (epoch, records)
        return self._student_epoch[1][sample]
