"""The dataset every spec builds: deterministic ``(x, y)`` items plus what a store records."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence, Sized
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.choices import INPUT_FORMS
from kdcache.data.pixels import JpegGeometry, PixelNormalization
from kdcache.errors import ConfigError


class LabeledDataset(Dataset):
    """A dataset built from a spec: deterministic ``(x, y)`` items plus metadata.

    Attributes: ``spec``, ``split``, ``num_classes``, ``in_channels``, ``transform_description``,
    ``class_names`` (the class folders of an image set, ``None`` where classes have no names)
    and ``labels`` (int64 array of all N labels, obtained without decoding images where possible).
    ``input_form`` says what the items hold (:data:`INPUT_FORMS`; float32 unless chosen with
    :meth:`with_inputs`); ``normalization`` turns uint8 items into the float32 ones and
    ``jpeg_geometry`` (imagefolder) says how a decoded file is resized and cropped.
    """

    def __init__(
        self,
        base: Dataset,
        *,
        spec: str,
        split: str,
        num_classes: int,
        in_channels: int,
        transform_description: str,
        labels: np.ndarray | Callable[[], np.ndarray],
        uint8_base: Dataset | None = None,
        normalization: PixelNormalization | None = None,
        jpeg_base: Dataset | None = None,
        jpeg_geometry: JpegGeometry | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self._base = base
        self._forms: dict[str, Dataset] = {"float32": base}
        if uint8_base is not None and normalization is not None:
            self._forms["uint8"] = uint8_base
            if jpeg_base is not None and jpeg_geometry is not None:
                self._forms["jpeg"] = jpeg_base
        self.input_form = "float32"
        self._items = base
        self.spec = spec
        self.split = split
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.transform_description = transform_description
        self.class_names = None if class_names is None else tuple(class_names)
        self.normalization = normalization
        self.jpeg_geometry = jpeg_geometry
        # Some labels (FakeData) cost a pass over the data, so they may arrive as a function.
        self._labels = labels if isinstance(labels, np.ndarray) else None
        self._label_fn = None if isinstance(labels, np.ndarray) else labels

    @property
    def input_forms(self) -> tuple[str, ...]:
        """The :data:`INPUT_FORMS` this dataset can yield."""
        return tuple(form for form in INPUT_FORMS if form in self._forms)

    def with_inputs(self, form: str) -> LabeledDataset:
        """The same samples with items of ``form``: ``float32``, ``uint8`` or ``jpeg`` (files)."""
        if form not in self._forms:
            raise ConfigError(
                f"dataset {self.spec!r} cannot yield {form!r} inputs; it yields "
                f"{', '.join(self.input_forms)} (jpeg is for imagefolder datasets)"
            )
        view = copy.copy(self)
        view.input_form, view._items = form, self._forms[form]
        return view

    def float_input(self, index: int) -> torch.Tensor:
        """Item ``index``'s float32 input, whatever :attr:`input_form` is (for fingerprints)."""
        return self._base[operator.index(index)][0]

    @property
    def labels(self) -> np.ndarray:
        """All labels as an int64 array of length ``len(self)``, computed once."""
        if self._labels is None:
            assert self._label_fn is not None  # set whenever labels were not given as an array
            self._labels = np.asarray(self._label_fn(), dtype=np.int64)
        return self._labels

    def __len__(self) -> int:
        return len(cast(Sized, self._base))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        x, y = self._items[i % n]
        return x, int(y)

    def __repr__(self) -> str:
        form = "" if self.input_form == "float32" else f", inputs={self.input_form!r}"
        return f"LabeledDataset({self.spec!r}, split={self.split!r}, n={len(self)}{form})"


class ArrayDataset(Dataset):
    """Items from in-memory arrays; copies each input so callers cannot alter the shared cache."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.inputs[i].copy()), int(self.labels[i])
