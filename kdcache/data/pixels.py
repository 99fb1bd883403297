"""Pixels to model inputs: uint8 images and JPEG files become float32 images on any device.

Datasets (:mod:`kdcache.data.datasets`) can hand out uint8 images or undecoded JPEG files instead of
float32 tensors, so a batch crosses to the device with a quarter of the bytes (or fewer); the
functions here finish the job where the batch lands, identically on the CPU and within rounding
on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

_JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class PixelNormalization:
    """How uint8 pixels become the dataset's float32 inputs: ``((x / divisor) - mean) / std``.

    The operations are torchvision's ``ToTensor`` and ``Normalize`` in their order, so the result is
    bit-identical to the float32 items on the CPU, and equal within rounding on a GPU. ``mean``
    and ``std`` are per channel, or ``None`` when the dataset does not normalise.
    """

    divisor: float
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 images from uint8 ``(..., C, H, W)`` pixels, on the pixels' device."""
        x = pixels.to(torch.float32).div_(self.divisor)
        if self.mean is not None and self.std is not None:
            x.sub_(_per_channel(self.mean, x.device)).div_(_per_channel(self.std, x.device))
        return x

    def to_dict(self) -> dict[str, Any]:
        return {"divisor": self.divisor, "mean": self.mean, "std": self.std}


@functools.lru_cache(maxsize=64)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Made once per device: building it every batch would be a blocking copy to the GPU, which
    # waits for every queued step and so stops the host from running ahead.
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


@dataclass(frozen=True)
class JpegGeometry:
    """What ``imagefolder`` does to a decoded image: shorter side to ``resize``, centre ``crop``."""

    resize: int
    crop: int


def collate_files(
    batch: Sequence[tuple[torch.Tensor, int, int]],
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for items holding encoded files, which differ in length.

    The files travel as one uint8 buffer plus their lengths (see :func:`split_files`): two shared
    tensors per batch between worker processes instead of one per file, each costing a file
    descriptor and a round trip.
    """
    files, labels, indices = zip(*batch, strict=True)
    lengths = torch.tensor([f.numel() for f in files], dtype=torch.int64)
    return (torch.cat(files), lengths), torch.tensor(labels), torch.tensor(indices)


def split_files(batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """The files of a :func:`collate_files` batch, as views of its buffer."""
    data, lengths = batch
    return list(torch.split(data, lengths.tolist()))


def decode_files(
    files: Sequence[torch.Tensor], geometry: JpegGeometry, *, device: torch.device
) -> torch.Tensor:
    """Decode, resize and crop image files into a uint8 ``(B, 3, crop, crop)`` batch on ``device``.

    JPEGs are decoded in one batched call on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the
    CPU); any other format is decoded on the CPU. Images of one size are resized together
    (antialiased bilinear, as PIL's ``Resize``): a folder of same-sized photos costs a few kernels
    per batch, not a few per image.
    """
    is_jpeg = [bytes(f[:2].tolist()) == _JPEG_MAGIC for f in files]
    jpegs = [f for f, j in zip(files, is_jpeg, strict=True) if j]
    decoded_jpegs = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    images = [
        next(decoded_jpegs) if j else decode_image(f, mode=ImageReadMode.RGB).to(device)
        for f, j in zip(files, is_jpeg, strict=True)
    ]
    out = torch.empty(
        (len(images), 3, geometry.crop, geometry.crop), dtype=torch.uint8, device=device
    )
    by_size: dict[tuple[int, int], list[int]] = {}
    for position, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(position)
    for positions in by_size.values():
        group = torch.stack([images[p] for p in positions])
        group = TF.resize(group, [geometry.resize], antialias=True)
        out[positions] = TF.center_crop(group, [geometry.crop, geometry.crop])
    return out
