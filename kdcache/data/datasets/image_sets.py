"""Datasets on disk: ``imagefolder`` and the torchvision sets (CIFAR, MNIST); never downloaded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.io import read_file

from kdcache.data.datasets.labeled import LabeledDataset
from kdcache.data.pixels import JpegGeometry, PixelNormalization
from kdcache.errors import ConfigError, DatasetNotFoundError

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


class _ImageFolderWithClasses(tv_datasets.ImageFolder):
    """ImageFolder with a given class list, so val labels use the train split's class indices."""

    def __init__(self, root: str, classes: list[str], **kwargs) -> None:
        self._given_classes = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {c: i for i, c in enumerate(self._given_classes)}


#: Kinds whose spec names a folder: their datasets carry the spec with that folder resolved, so
#: a store or checkpoint that records it finds the folder from any working directory.
ON_DISK_KINDS = ("imagefolder", "cifar10", "cifar100", "mnist")


def resolved_spec(kind: str, args: str) -> str:
    """``KIND:ARGS`` with the folder made absolute (``imagefolder:PATH:SIZE`` keeps its SIZE)."""
    path, size = args, ""
    head, sep, tail = args.rpartition(":")
    if kind == "imagefolder" and sep and head and tail.lstrip("-").isdigit():
        path, size = head, f":{tail}"
    return f"{kind}:{Path(path).expanduser().resolve()}{size}"


def build_imagefolder(spec: str, args: str, split: str) -> LabeledDataset:
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
        spec=resolved_spec("imagefolder", args),
        split=split,
        num_classes=len(base.classes),
        class_names=base.classes,
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


def build_torchvision_set(spec: str, kind: str, root: str, split: str) -> LabeledDataset:
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
        spec=resolved_spec(kind, root),
        split=split,
        num_classes=classes,
        class_names=getattr(base, "classes", None),
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
