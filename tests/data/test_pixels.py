"""uint8 and JPEG inputs become the datasets' float32 images: exactly, or (JPEG) within rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from narrowing import present
from PIL import Image

from kdcache.data.datasets import build_dataset
from kdcache.data.pixels import (
    JpegGeometry,
    PixelNormalization,
    collate_files,
    decode_files,
    split_files,
)

#: One grey level of a uint8 image, after ImageNet normalisation (the smallest std is 0.224).
GREY_LEVEL = 1 / (255 * 0.224)


def write_images(root: Path, sizes: list[tuple[int, int]], *, seed: int = 0) -> None:
    """JPEGs (one greyscale, one PNG among them) of smooth content plus noise, in two classes."""
    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            y, x = np.mgrid[0:h, 0:w]
            noise = rng.integers(0, 40, (h, w))
            image = np.stack([x * 255 / w, y * 255 / h, (x + y) * 100 / (w + h) + noise], -1)
            pil = Image.fromarray(image.clip(0, 255).astype(np.uint8))
            if i == 1:
                pil = pil.convert("L")
            pil.save(folder / f"{i}.jpg", quality=90)
        pil.save(folder / "extra.png")


@pytest.mark.parametrize("spec", ["digits", "fake:12:10:3", "synthetic:12:10:3"])
def test_uint8_items_normalise_to_the_float_items_bit_for_bit(spec):
    data = build_dataset(spec)
    pixels = data.with_inputs("uint8")
    assert pixels.input_form == "uint8"
    assert data.input_form == "float32"
    for i in (0, 5, len(data) - 1):
        x = pixels[i][0]
        assert x.dtype == torch.uint8
        assert torch.equal(present(pixels.normalization)(x), data[i][0])
        assert pixels[i][1] == data[i][1]


def test_imagefolder_uint8_items_match_the_normalised_float_items(tmp_path):
    write_images(tmp_path, [(30, 22), (22, 30)])
    data = build_dataset(f"imagefolder:{tmp_path}:16")
    assert data.input_forms == ("float32", "uint8", "jpeg")
    pixels = data.with_inputs("uint8")
    for i in range(len(data)):
        assert torch.equal(present(pixels.normalization)(pixels[i][0]), data[i][0])


def test_the_jpeg_path_decodes_like_pil_within_a_few_grey_levels(tmp_path):
    write_images(tmp_path, [(40, 30), (30, 40), (40, 30), (25, 25), (64, 48)])
    data = build_dataset(f"imagefolder:{tmp_path}:20")
    files = data.with_inputs("jpeg")
    batch = [(*files[i], i) for i in range(len(files))]
    collated, labels, indices = collate_files(batch)
    encoded = split_files(collated)
    assert [torch.equal(f, files[i][0]) for i, f in enumerate(encoded)] == [True] * len(data)
    assert labels.tolist() == data.labels.tolist()
    assert indices.tolist() == list(range(len(data)))
    pixels = decode_files(encoded, present(data.jpeg_geometry), device=torch.device("cpu"))
    assert pixels.shape == (len(data), 3, 20, 20)
    assert pixels.dtype == torch.uint8
    inputs = present(files.normalization)(pixels)
    reference = torch.stack([data[i][0] for i in range(len(data))])
    levels = (inputs - reference).abs() / GREY_LEVEL
    # libjpeg-turbo and PIL's libjpeg round the IDCT and upsampling differently, by a level or two.
    assert levels.mean() < 0.5, (levels.mean(), levels.max())
    assert levels.max() < 4, (levels.mean(), levels.max())
    # the (path, label) list of the folder listing behind the jpeg form: private, so untyped
    samples = files._items.samples  # type: ignore[attr-defined]
    png = [i for i, (path, _) in enumerate(samples) if path.endswith(".png")]
    assert png
    assert levels[png].max() < 1.5


def test_jpeg_geometry_resizes_the_shorter_side_then_crops(tmp_path):
    write_images(tmp_path, [(64, 32)])
    data = build_dataset(f"imagefolder:{tmp_path}")  # Resize(256), CenterCrop(224)
    assert data.jpeg_geometry == JpegGeometry(256, 224)
    files = data.with_inputs("jpeg")
    pixels = decode_files([files[0][0]], present(data.jpeg_geometry), device=torch.device("cpu"))
    assert pixels.shape == (1, 3, 224, 224)
    levels = (present(files.normalization)(pixels)[0] - data[0][0]).abs() / GREY_LEVEL
    assert levels.mean() < 0.5


def test_pixel_normalization_runs_on_the_pixels_device_and_keeps_channels_last():
    norm = PixelNormalization(255.0, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(3, 1, 1)
    out = norm(pixels.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert norm.to_dict() == {"divisor": 255.0, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
