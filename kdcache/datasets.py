"""Datasets named by a spec string, and fingerprints that tie a logit store to its dataset.

A spec is ``KIND`` or ``KIND:ARGS`` (see :data:`DATASET_KINDS`). Every dataset yields
``(x, y)`` with ``x`` a float32 tensor ``(C, H, W)`` and ``y`` an int, identically on every call,
because cached teacher logits are only valid for exactly the inputs they were computed on.
kdcache never downloads: datasets that need files must already be on disk. ``unlabeled:SPEC`` is
SPEC with every label -1, the label of a sample without one (an unlabeled transfer set).

Every kind can also yield its images as uint8 ``(C, H, W)`` (:meth:`LabeledDataset.with_inputs`),
a quarter of the bytes to move; :class:`PixelNormalization` then turns them into exactly the
float32 tensors above (the same operations in the same order), wherever it runs. ``imagefolder``
can yield the undecoded files too (``"jpeg"``), for decoding on the GPU.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import operator
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.io import read_file

from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError
from kdcache.logits.losses import UNLABELED
from kdcache.pixels import INPUT_FORMS, JpegGeometry, PixelNormalization

DATASET_KINDS = (
    "digits",
    "fake",
    "synthetic",
    "imagefolder",
    "cifar10",
    "cifar100",
    "mnist",
    "unlabeled",
)
SPLITS = ("train", "test")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name, torchvision class, folder it expects under ROOT, channels, classes, mean, std
_TORCHVISION_SETS = {
    "cifar10": (
        "CIFAR-10",
        tv_datasets.CIFAR10,
        "cifar-10-batches-py",
        3,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "CIFAR-100",
        tv_datasets.CIFAR100,
        "cifar-100-python",
        3,
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "mnist": ("MNIST", tv_datasets.MNIST, "MNIST/raw", 1, 10, (0.1307,), (0.3081,)),
}


class LabeledDataset(Dataset):
    """A dataset built from a spec: deterministic ``(x, y)`` items plus metadata.

    Attributes: ``spec``, ``split``, ``num_classes``, ``in_channels``, ``transform_description``
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


class _ArrayDataset(Dataset):
    """Items from in-memory arrays; copies each input so callers cannot alter the shared cache."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.inputs[i].copy()), int(self.labels[i])


class _ImageFolderWithClasses(tv_datasets.ImageFolder):
    """ImageFolder with a given class list, so val labels use the train split's class indices."""

    def __init__(self, root: str, classes: list[str], **kwargs) -> None:
        self._given_classes = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {c: i for i, c in enumerate(self._given_classes)}


def build_dataset(spec: str, *, split: str = "train") -> LabeledDataset:
    """Build the dataset a spec names: ``digits``, ``fake:1000:224:1000``, ``cifar10:/data``..."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    kind, _, args = spec.partition(":")
    if kind not in DATASET_KINDS:
        raise SpecError(
            f"unknown dataset kind {kind!r} in spec {spec!r}; "
            f"valid kinds: {', '.join(DATASET_KINDS)} (e.g. 'digits' or 'fake:1000')"
        )
    if kind == "digits":
        size = 8
        if args:
            if not (args.isdigit() and int(args) >= 8):
                raise SpecError(
                    f"malformed dataset spec {spec!r}; expected 'digits' or 'digits:SIZE' with an "
                    "integer SIZE >= 8, e.g. digits:32"
                )
            size = int(args)
        inputs, labels = _digits_split(size)[split]
        upscaled = "" if size == 8 else f", bilinear upscale to ({size},{size})"
        return LabeledDataset(
            _ArrayDataset(inputs, labels),
            spec=spec,
            split=split,
            num_classes=10,
            in_channels=1,
            labels=labels.copy(),
            transform_description=f"digits: x/16 as float32 (1,8,8){upscaled}",
            # x holds the integers 0..16 over 16, so uint8 x*16 holds them exactly; an upscaled
            # image holds other values, so it has the float32 form only.
            uint8_base=None
            if size != 8
            else _ArrayDataset((inputs * 16).round().astype(np.uint8), labels),
            normalization=None if size != 8 else PixelNormalization(16.0),
        )
    if kind in ("fake", "synthetic"):
        return _generated(spec, kind, args, split)
    if kind == "unlabeled":
        return _unlabeled(spec, args, split)
    if not args:
        form = (
            "imagefolder:PATH or imagefolder:PATH:SIZE" if kind == "imagefolder" else f"{kind}:ROOT"
        )
        raise SpecError(f"dataset spec {spec!r} lacks its path; expected {form}")
    if kind == "imagefolder":
        return _imagefolder(spec, args, split)
    return _torchvision_set(spec, kind, args, split)


def labeled_spec(spec: str) -> str:
    """The spec of the labelled dataset behind ``unlabeled:SPEC`` (``spec`` itself otherwise):
    where a run on an unlabeled transfer set measures its validation accuracy."""
    while spec.startswith("unlabeled:"):
        spec = spec[len("unlabeled:") :]
    return spec


class _WithoutLabels(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[index][0], UNLABELED


def _unlabeled(spec: str, args: str, split: str) -> LabeledDataset:
    """``unlabeled:SPEC``: SPEC's inputs and classes, every label -1 (an unlabeled pool)."""
    if not args:
        raise SpecError(
            f"dataset spec {spec!r} lacks its dataset; expected unlabeled:SPEC, "
            "e.g. unlabeled:digits"
        )
    inner = build_dataset(args, split=split)
    return LabeledDataset(
        _WithoutLabels(inner),
        spec=spec,
        split=split,
        num_classes=inner.num_classes,
        in_channels=inner.in_channels,
        labels=np.full(len(inner), UNLABELED, dtype=np.int64),
        transform_description=f"{inner.transform_description}; labels dropped (-1)",
    )


@functools.cache
def _digits_split(size: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 8x8 digits, or upscaled to ``size`` pixels: room for crops that keep the digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        upscaled = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
        )
        x = upscaled.numpy()
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    for a in (x_train, x_test, y_train, y_test):
        a.setflags(write=False)  # shared by every digits dataset in this process
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


#: SIZE and CLASSES of ``fake:N`` / ``synthetic:N`` when the spec leaves them out.
_GENERATED_DEFAULTS = (32, 10)
#: Bounds of generated datasets: larger ones cannot be labelled or allocated in reasonable time.
_GENERATED_LIMITS = {"N": 100_000_000, "SIZE": 4096, "CLASSES": 1_000_000}


def canonical_dataset_spec(spec: str) -> str:
    """``spec`` with its defaults spelled out, so that equal datasets compare equal
    (``fake:100:8`` and ``fake:100:8:10``); other specs are returned unchanged."""
    kind, _, args = spec.partition(":")
    parts = args.split(":")
    if kind not in ("fake", "synthetic") or not 1 <= len(parts) <= 3:
        return spec
    try:
        values = [int(part) for part in parts]
    except ValueError:
        return spec
    values += list(_GENERATED_DEFAULTS[len(values) - 1 :])
    return f"{kind}:" + ":".join(map(str, values))


def _generated(spec: str, kind: str, args: str, split: str) -> LabeledDataset:
    form = (
        f"{kind}:N or {kind}:N:SIZE:CLASSES with integers, e.g. {kind}:1000 or {kind}:1000:224:1000"
    )
    parts = args.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SpecError(f"malformed dataset spec {spec!r}; expected {form}") from None
    if not 1 <= len(values) <= 3:
        raise SpecError(f"malformed dataset spec {spec!r}; expected {form}")
    n, size, classes = values + list(_GENERATED_DEFAULTS[len(values) - 1 :])
    for name, value, low in (("N", n, 1), ("SIZE", size, 1), ("CLASSES", classes, 2)):
        if value < low:
            raise ConfigError(
                f"{name}={value} in dataset spec {spec!r} is too small; "
                f"expected {name} >= {low} in {form}"
            )
        if value > _GENERATED_LIMITS[name]:
            raise ConfigError(
                f"{name}={value:,} in dataset spec {spec!r} is too large; expected {name} <= "
                f"{_GENERATED_LIMITS[name]:,} in {form}"
            )
    # Test seeds continue where train seeds stop, so no test image repeats a train image.
    size_n, offset = (n, 0) if split == "train" else (max(1, n // 5), n)
    if kind == "synthetic":
        images = _SyntheticImages(size_n, size=size, num_classes=classes, seed=offset)
        return LabeledDataset(
            images,
            spec=spec,
            split=split,
            num_classes=classes,
            in_channels=3,
            labels=images.labels.copy(),
            transform_description=f"synthetic: bank of {_SyntheticImages.BANK} "
            f"uniform uint8 (3,{size},{size}) images / 255, rolled per "
            f"index, seed {offset}",
            uint8_base=images.as_uint8(),
            normalization=PixelNormalization(255.0),
        )
    base = tv_datasets.FakeData(
        size=size_n,
        image_size=(3, size, size),
        num_classes=classes,
        transform=T.ToTensor(),
        random_offset=offset,
    )
    return LabeledDataset(
        base,
        spec=spec,
        split=split,
        num_classes=classes,
        in_channels=3,
        labels=functools.partial(_fake_labels, base),
        transform_description=f"fake: ToTensor of FakeData (3,{size},{size}), seed index+{offset}",
        uint8_base=tv_datasets.FakeData(
            size=size_n,
            image_size=(3, size, size),
            num_classes=classes,
            transform=T.PILToTensor(),
            random_offset=offset,
        ),
        normalization=PixelNormalization(255.0),
    )


class _SyntheticImages(Dataset):
    """Deterministic random images that cost one copy each, for throughput benchmarks.

    FakeData builds every image through PIL (milliseconds at 224 px), which starves a GPU
    student; here sample i is image ``i % BANK`` of a fixed random uint8 bank, rolled by
    ``i // BANK`` pixels, so consecutive banks' worth of samples still differ. Items are the
    pixels / 255 as float32, or the uint8 pixels themselves (:meth:`as_uint8`).
    """

    BANK = 64

    def __init__(
        self, num_samples: int, *, size: int, num_classes: int, seed: int, uint8: bool = False
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.bank = torch.randint(
            0, 256, (self.BANK, 3, size, size), generator=generator, dtype=torch.uint8
        )
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=generator).numpy()
        self.uint8 = uint8

    def as_uint8(self) -> _SyntheticImages:
        view = copy.copy(self)
        view.uint8 = True
        return view

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.roll(self.bank[index % self.BANK], shifts=index // self.BANK, dims=-1)
        return (image if self.uint8 else image.float().div_(255.0)), int(self.labels[index])


def _fake_labels(fake: tv_datasets.FakeData) -> np.ndarray:
    """FakeData's labels without building images: same seed, same draws, on a private generator."""
    labels = np.empty(len(fake), dtype=np.int64)
    gen = torch.Generator()
    for i in range(len(fake)):
        gen.manual_seed(i + fake.random_offset)
        torch.randn(*fake.image_size, generator=gen)  # advances the generator as FakeData does
        labels[i] = torch.randint(0, fake.num_classes, size=(1,), generator=gen).item()
    return labels


def _imagefolder(spec: str, args: str, split: str) -> LabeledDataset:
    path_str, size = args, None
    head, sep, tail = args.rpartition(":")
    if sep and head and tail.lstrip("-").isdigit():
        path_str, size = head, int(tail)
        if size < 1:
            raise ConfigError(
                f"SIZE={size} in dataset spec {spec!r} must be >= 1; "
                "expected imagefolder:PATH:SIZE, e.g. imagefolder:/data/tiny:64"
            )
    root = Path(path_str)
    train_dir = root / "train"
    folder = train_dir
    if split == "test":
        folder = next((d for d in (root / "val", root / "test") if d.is_dir()), root / "val")
    if not folder.is_dir():
        expected = f"{root / 'val'} or {root / 'test'}" if split == "test" else str(train_dir)
        raise DatasetNotFoundError(
            f"imagefolder {split} split not found: expected folder "
            f"{expected} with one subfolder of images per class"
        )
    resize, crop = (256, 224) if size is None else (size, size)
    geometry = [T.Resize(resize), T.CenterCrop(crop)]
    tf = T.Compose([*geometry, T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    find_classes = tv_datasets.folder.find_classes
    try:
        if split == "test" and train_dir.is_dir():
            classes = find_classes(str(train_dir))[0]
            extra = sorted(set(find_classes(str(folder))[0]) - set(classes))
            base = _ImageFolderWithClasses(str(folder), classes, transform=tf, allow_empty=True)
        else:
            extra = []
            base = tv_datasets.ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"no usable images for the imagefolder {split} split: "
            f"{str(e).splitlines()[0]}; expected one subfolder of images "
            "per class"
        ) from None
    if extra:
        raise DatasetNotFoundError(
            f"{folder} has class folders missing from {train_dir}: "
            f"{', '.join(extra)}; the test split needs the train split's "
            "classes"
        )
    if len(base) == 0:
        raise DatasetNotFoundError(
            f"no images found under {folder}; expected one subfolder of images per class"
        )
    return LabeledDataset(
        base,
        spec=spec,
        split=split,
        num_classes=len(base.classes),
        in_channels=3,
        labels=np.asarray(base.targets, dtype=np.int64),
        transform_description=f"imagefolder: RGB, Resize({resize}), "
        f"CenterCrop({crop}), ToTensor, "
        "Normalize(ImageNet mean/std)",
        # Copies share the one scan of the folder; only what an item holds differs.
        uint8_base=_with(base, transform=T.Compose([*geometry, T.PILToTensor()])),
        normalization=PixelNormalization(255.0, _IMAGENET_MEAN, _IMAGENET_STD),
        jpeg_base=_with(base, transform=None, loader=read_file),
        jpeg_geometry=JpegGeometry(resize, crop),
    )


def _torchvision_set(spec: str, kind: str, root: str, split: str) -> LabeledDataset:
    name, cls, subdir, channels, classes, mean, std = _TORCHVISION_SETS[kind]
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    try:
        # download=False always: torchvision then only checks the files and raises RuntimeError.
        base = cls(root, train=split == "train", transform=tf, download=False)
    except RuntimeError:
        raise DatasetNotFoundError(
            f"{name} not found (or corrupt) under {root} (expected "
            f"{Path(root) / subdir}); kdcache never downloads: put the "
            "extracted dataset there"
        ) from None
    return LabeledDataset(
        base,
        spec=spec,
        split=split,
        num_classes=classes,
        in_channels=channels,
        labels=np.asarray(base.targets, dtype=np.int64),
        transform_description=f"{kind}: ToTensor, Normalize(mean={mean}, std={std})",
        uint8_base=_with(base, transform=T.PILToTensor()),
        normalization=PixelNormalization(255.0, mean, std),
    )


def _with(base: Dataset, **attributes: Any) -> Dataset:
    """A shallow copy of a torchvision dataset with some attributes (transform, loader) replaced."""
    twin = copy.copy(base)
    for name, value in attributes.items():
        setattr(twin, name, value)
    return twin


def dataset_fingerprint(dataset: LabeledDataset, *, num_input_samples: int = 16) -> dict:
    """Summarise a dataset's size, labels and a sample of its inputs, to detect a changed dataset.

    Inputs are hashed at ``num_input_samples`` evenly spaced indices including 0 and N-1.
    """
    if num_input_samples < 1:
        raise ConfigError(f"num_input_samples={num_input_samples} must be >= 1")
    n = len(dataset)
    k = min(num_input_samples, n)
    # A spacing of at least 1 (k <= n) keeps the floored indices distinct.
    indices = [0] if k == 1 else [i * (n - 1) // (k - 1) for i in range(k)]
    inputs = hashlib.sha256()
    for i in indices:
        x = dataset.float_input(i).detach().cpu().contiguous().numpy()
        inputs.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
    labels = np.ascontiguousarray(dataset.labels, dtype="<i8")
    return {
        "num_samples": n,
        "num_classes": int(dataset.num_classes),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "inputs_sha256": inputs.hexdigest(),
        "input_indices": indices,
    }


def compare_fingerprints(expected: dict, actual: dict) -> list[str]:
    """List the differences between a store's fingerprint (expected) and a dataset's (actual).

    Only keys present in both are compared, since older stores may lack some.
    """
    diffs = [
        f"{key}: store has {expected[key]}, dataset has {actual[key]}"
        for key in ("num_samples", "num_classes")
        if key in expected and key in actual and expected[key] != actual[key]
    ]
    if "labels_sha256" in expected and "labels_sha256" in actual:
        old, new = expected["labels_sha256"], actual["labels_sha256"]
        if old != new:
            diffs.append(f"labels differ (sha256 {old[:12]}… vs {new[:12]}…)")
    if "inputs_sha256" in expected and "inputs_sha256" in actual:
        old_idx, new_idx = expected.get("input_indices"), actual.get("input_indices")
        if old_idx is not None and new_idx is not None and list(old_idx) != list(new_idx):
            # A different N already explains different indices; report only the unexplained case.
            if expected.get("num_samples") == actual.get("num_samples"):
                diffs.append(
                    f"inputs sampled at different indices (store hashed {len(old_idx)}, "
                    f"dataset {len(new_idx)}); fingerprint both with the same "
                    "num_input_samples"
                )
        elif expected["inputs_sha256"] != actual["inputs_sha256"]:
            diffs.append("inputs differ at the sampled indices")
    return diffs
