"""``build_dataset``: the dataset a spec names, by kind; ``digits`` and ``unlabeled:SPEC``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.choices import SPLITS
from kdcache.data.datasets.generated import build_generated
from kdcache.data.datasets.glyphs import build_glyphs
from kdcache.data.datasets.image_sets import build_imagefolder, build_torchvision_set
from kdcache.data.datasets.labeled import ArrayDataset, LabeledDataset
from kdcache.data.pixels import PixelNormalization
from kdcache.errors import ConfigError, SpecError
from kdcache.logits.losses import UNLABELED

#: Builds the dataset of one kind from the whole spec (for messages), the text after ``KIND:``
#: (empty when there is none) and the split.
Builder = Callable[[str, str, str], LabeledDataset]


def build_dataset(spec: str, *, split: str = "train") -> LabeledDataset:
    """Build the dataset a spec names: ``digits``, ``fake:1000:224:1000``, ``cifar10:/data``..."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    name, _, args = spec.partition(":")
    build = DATASET_KINDS.get(name)
    if build is None:
        raise SpecError(
            f"unknown dataset kind {name!r} in spec {spec!r}; "
            f"valid kinds: {', '.join(DATASET_KINDS)} (e.g. 'digits' or 'fake:1000')"
        )
    return build(spec, args, split)


def _digits(spec: str, args: str, split: str) -> LabeledDataset:
    size, train_size, shift = _digits_args(spec, args)
    inputs, labels = _digits_split(size, train_size, shift)[split]
    upscaled = "" if size == 8 else f", bilinear upscale to ({size},{size})"
    if shift:
        upscaled += f", moved by up to {shift} px (fixed per sample, zero fill)"
    if train_size is not None and split == "train":
        upscaled += f", stratified subset of {train_size} samples"
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


def _generated(kind: str) -> Builder:
    return lambda spec, args, split: build_generated(spec, kind, args, split)


def _on_disk(form: str, build: Builder) -> Builder:
    """``build``, after refusing a spec without the path ``form`` asks for."""

    def checked(spec: str, args: str, split: str) -> LabeledDataset:
        if not args:
            raise SpecError(f"dataset spec {spec!r} lacks its path; expected {form}")
        return build(spec, args, split)

    return checked


def _torchvision_set(kind: str) -> Builder:
    return _on_disk(
        f"{kind}:ROOT", lambda spec, args, split: build_torchvision_set(spec, kind, args, split)
    )


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
        spec=f"unlabeled:{inner.spec}",
        split=split,
        num_classes=inner.num_classes,
        in_channels=inner.in_channels,
        labels=np.full(len(inner), UNLABELED, dtype=np.int64),
        transform_description=f"{inner.transform_description}; labels dropped (-1)",
        # Colour operations of augmentation recipes undo the inputs' normalisation.
        normalization=inner.normalization,
    )


def _digits_args(spec: str, args: str) -> tuple[int, int | None, int]:
    """SIZE, N and SHIFT of ``digits[:SIZE[:N[:SHIFT]]]``: the image size (8 is the original),
    the training samples kept (None: all 1,437) and the largest jitter in pixels (0: centred)."""
    parts = args.split(":") if args else []
    form = (
        "expected 'digits', 'digits:SIZE' (integer SIZE >= 8, e.g. digits:32), 'digits:SIZE:N' "
        f"(N training samples, 10 <= N <= {DIGITS_TRAIN_SIZE - 10} or N = {DIGITS_TRAIN_SIZE}, "
        "e.g. digits:16:300) or "
        "'digits:SIZE:N:SHIFT' (every image moved by up to SHIFT < SIZE/2 pixels, e.g. "
        "digits:16:300:3)"
    )
    if len(parts) > 3 or not all(part.isdigit() for part in parts):
        raise SpecError(f"malformed dataset spec {spec!r}; {form}")
    size, train_size, shift = [int(part) for part in parts] + [8, DIGITS_TRAIN_SIZE, 0][
        len(parts) :
    ]
    # A stratified subset leaves at least one sample of each of the 10 classes out.
    subset_ok = 10 <= train_size <= DIGITS_TRAIN_SIZE - 10 or train_size == DIGITS_TRAIN_SIZE
    if size < 8 or not subset_ok or 2 * shift >= size:
        raise SpecError(f"malformed dataset spec {spec!r}; {form}")
    return size, None if train_size == DIGITS_TRAIN_SIZE else train_size, shift


#: Training samples of the digits split (the other 360 are the test split).
DIGITS_TRAIN_SIZE = 1437


@functools.cache
def _digits_split(
    size: int = 8, train_size: int | None = None, shift: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 8x8 digits, or upscaled to ``size`` pixels: room for crops that keep the digit.

    ``train_size`` keeps a stratified subset of the training split and ``shift`` moves every
    image, train and test alike, by a fixed random offset of up to ``shift`` pixels each way
    (zero fill): a data-scarce task with a nuisance (position) the few training samples do not
    cover, on which a translation augmentation is the sensible prior. The test split keeps all
    360 samples so that accuracies stay comparable."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        upscaled = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
        )
        x = upscaled.numpy()
    if shift:
        x = _jittered(x, shift)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    if train_size is not None:
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=train_size, random_state=0, stratify=y_train
        )
    for a in (x_train, x_test, y_train, y_test):
        a.setflags(write=False)  # shared by every digits dataset in this process
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def _jittered(x: np.ndarray, shift: int) -> np.ndarray:
    """Each image moved by its own offset in [-shift, shift]^2 (seed 0, so fixed), zero fill."""
    offsets = np.random.default_rng(0).integers(-shift, shift + 1, size=(len(x), 2))
    size = x.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, :, shift - dy : shift - dy + size, shift - dx : shift - dx + size]
    return out


#: Every dataset kind, by the name before the first ``:`` of a spec.
DATASET_KINDS: dict[str, Builder] = {
    "digits": _digits,
    "fake": _generated("fake"),
    "synthetic": _generated("synthetic"),
    "glyphs": build_glyphs,
    "imagefolder": _on_disk("imagefolder:PATH or imagefolder:PATH:SIZE", build_imagefolder),
    "cifar10": _torchvision_set("cifar10"),
    "cifar100": _torchvision_set("cifar100"),
    "mnist": _torchvision_set("mnist"),
    "unlabeled": _unlabeled,
}
