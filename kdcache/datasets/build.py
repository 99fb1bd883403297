"""``build_dataset``: the dataset a spec names, by kind; ``digits`` and ``unlabeled:SPEC``."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.datasets.generated import build_generated
from kdcache.datasets.image_sets import build_imagefolder, build_torchvision_set
from kdcache.datasets.labeled import ArrayDataset, LabeledDataset
from kdcache.errors import ConfigError, SpecError
from kdcache.logits.losses import UNLABELED
from kdcache.pixels import PixelNormalization

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
            ArrayDataset(inputs, labels),
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
            else ArrayDataset((inputs * 16).round().astype(np.uint8), labels),
            normalization=None if size != 8 else PixelNormalization(16.0),
        )
    if kind in ("fake", "synthetic"):
        return build_generated(spec, kind, args, split)
    if kind == "unlabeled":
        return _unlabeled(spec, args, split)
    if not args:
        form = (
            "imagefolder:PATH or imagefolder:PATH:SIZE" if kind == "imagefolder" else f"{kind}:ROOT"
        )
        raise SpecError(f"dataset spec {spec!r} lacks its path; expected {form}")
    if kind == "imagefolder":
        return build_imagefolder(spec, args, split)
    return build_torchvision_set(spec, kind, args, split)


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
