"""Generated datasets: ``fake`` (torchvision FakeData) and ``synthetic`` (a rolled random bank)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from kdcache.data.datasets.glyphs import canonical_glyphs_spec
from kdcache.data.datasets.image_sets import ON_DISK_KINDS, resolved_spec
from kdcache.data.datasets.labeled import LabeledDataset
from kdcache.data.pixels import PixelNormalization
from kdcache.errors import ConfigError, SpecError

#: SIZE and CLASSES of ``fake:N`` / ``synthetic:N`` when the spec leaves them out.
_GENERATED_DEFAULTS = (32, 10)
#: Bounds of generated datasets: larger ones cannot be labelled or allocated in reasonable time.
_GENERATED_LIMITS = {"N": 100_000_000, "SIZE": 4096, "CLASSES": 1_000_000}


def canonical_dataset_spec(spec: str) -> str:
    """``spec`` with its defaults spelled out and its folder made absolute, so that equal datasets
    compare equal (``fake:100:8`` and ``fake:100:8:10``, ``glyphs:100`` and
    ``glyphs:100:32:100``) and a recorded spec finds its folder from anywhere; other specs are
    returned unchanged."""
    kind, _, args = spec.partition(":")
    parts = args.split(":")
    if kind == "unlabeled" and args:
        return f"unlabeled:{canonical_dataset_spec(args)}"
    if kind in ON_DISK_KINDS and args:
        return resolved_spec(kind, args)
    if kind == "glyphs":
        return canonical_glyphs_spec(spec)
    if kind not in ("fake", "synthetic") or not 1 <= len(parts) <= 3:
        return spec
    try:
        values = [int(part) for part in parts]
    except ValueError:
        return spec
    values += list(_GENERATED_DEFAULTS[len(values) - 1 :])
    return f"{kind}:" + ":".join(map(str, values))


def build_generated(spec: str, kind: str, args: str, split: str) -> LabeledDataset:
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
    base = _FakeData(
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
        uint8_base=_FakeData(
            size=size_n,
            image_size=(3, size, size),
            num_classes=classes,
            transform=T.PILToTensor(),
            random_offset=offset,
        ),
        normalization=PixelNormalization(255.0),
    )


class _FakeData(tv_datasets.FakeData):
    """torchvision's FakeData, the same images and labels, drawn from a private generator.

    FakeData seeds torch's global generator for each item and puts its state back: a loader
    thread doing so while the training thread draws dropout masks, or while another loader
    thread does the same (an evaluation inside an epoch beside the training's prefetch), mixes
    their draws. A generator of its own, seeded alike, gives the same numbers and shares nothing.
    """

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index >= len(self):
            raise IndexError(f"{self.__class__.__name__} index out of range")
        generator = torch.Generator().manual_seed(index + self.random_offset)
        pixels = torch.randn(*self.image_size, generator=generator)
        target = torch.randint(0, self.num_classes, size=(1,), generator=generator)[0]
        image = T.ToPILImage()(pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


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
