"""``glyphs:CLASSES[:SIZE[:PER_CLASS]]``: many-class images drawn from matplotlib's fonts, cached.

CLASSES distinct characters (:mod:`~kdcache.data.datasets.glyph_render` says which and how a
sample is drawn), PER_CLASS training samples of each (the test split always has
:data:`TEST_PER_CLASS`, so accuracies compare across PER_CLASS), SIZE x SIZE grayscale, white
ink on black. The samples are drawn once and kept in the cache folder (:func:`cache_folder`)
under a key naming everything that shapes their pixels: the spec, the split, the renderer's
version, the fonts' sha256 and the Pillow, FreeType and torch versions; a file is used only when
its recorded sha256 matches its contents, and is drawn again otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.data.datasets.glyph_render import (
    RENDER_VERSION,
    font_digests,
    glyph_classes,
    one_torch_thread,
    render_samples,
    sample_draws,
)
from kdcache.data.datasets.labeled import LabeledDataset
from kdcache.data.pixels import PixelNormalization
from kdcache.errors import ConfigError, SpecError

#: SIZE and PER_CLASS when the spec leaves them out.
GLYPHS_DEFAULTS = (32, 100)
#: Test samples of every class, whatever PER_CLASS is.
TEST_PER_CLASS = 20
_LIMITS = {"SIZE": (8, 256), "PER_CLASS": (1, 100_000)}
#: The most bytes of images one split may hold: it is kept in memory.
_MAX_BYTES = 4 << 30
#: Where the rendered datasets live when set; else ``$XDG_CACHE_HOME/kdcache``.
CACHE_DIR_ENV = "KDCACHE_CACHE_DIR"
_FORM = (
    "glyphs:CLASSES[:SIZE[:PER_CLASS]] with integers 2 <= CLASSES <= the distinct glyphs of "
    f"matplotlib's fonts, {_LIMITS['SIZE'][0]} <= SIZE <= {_LIMITS['SIZE'][1]} (default "
    f"{GLYPHS_DEFAULTS[0]}), {_LIMITS['PER_CLASS'][0]} <= PER_CLASS <= "
    f"{_LIMITS['PER_CLASS'][1]:,} (default {GLYPHS_DEFAULTS[1]}), "
    "e.g. glyphs:1000 or glyphs:100:32:50"
)


def cache_folder() -> Path:
    """Where rendered datasets are kept: ``$KDCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdcache``,
    else ``~/.cache/kdcache``."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache"


def canonical_glyphs_spec(spec: str) -> str:
    """``glyphs:CLASSES[:SIZE[:PER_CLASS]]`` with SIZE and PER_CLASS spelled out (a malformed
    spec unchanged: building it says what is wrong)."""
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 3 or not all(part.isdigit() for part in parts):
        return spec
    values = [int(part) for part in parts] + list(GLYPHS_DEFAULTS[len(parts) - 1 :])
    return "glyphs:" + ":".join(map(str, values))


def parse_glyphs_spec(spec: str, args: str) -> tuple[int, int, int]:
    """CLASSES, SIZE and PER_CLASS of ``glyphs:CLASSES[:SIZE[:PER_CLASS]]`` (``args`` is the text
    after ``glyphs:``), checked against their ranges (CLASSES against the fonts' distinct glyphs
    only when the split is drawn)."""
    parts = args.split(":") if args else []
    if not 1 <= len(parts) <= 3 or not all(part.isdigit() for part in parts):
        raise SpecError(f"malformed dataset spec {spec!r}; expected {_FORM}")
    classes, size, per_class = [int(part) for part in parts] + list(
        GLYPHS_DEFAULTS[len(parts) - 1 :]
    )
    for name, value in (("SIZE", size), ("PER_CLASS", per_class)):
        low, high = _LIMITS[name]
        if not low <= value <= high:
            raise ConfigError(
                f"{name}={value:,} in dataset spec {spec!r} is out of range; expected "
                f"{low} <= {name} <= {high:,} in {_FORM}"
            )
    if classes < 2:
        raise ConfigError(
            f"CLASSES={classes} in dataset spec {spec!r} is out of range; expected {_FORM}"
        )
    if classes * max(per_class, TEST_PER_CLASS) * size * size > _MAX_BYTES:
        raise ConfigError(
            f"dataset spec {spec!r} asks for {classes * per_class * size * size / 2**30:.1f} GiB "
            f"of images; at most {_MAX_BYTES >> 30} GiB a split are kept in memory: lower "
            "CLASSES, SIZE or PER_CLASS"
        )
    return classes, size, per_class


def build_glyphs(spec: str, args: str, split: str) -> LabeledDataset:
    """The ``split`` of ``glyphs:ARGS``, drawn or read from the cache."""
    classes, size, per_class = parse_glyphs_spec(spec, args)
    images, labels, characters = glyph_samples(classes, size, per_class, split)
    count = per_class if split == "train" else TEST_PER_CLASS
    return LabeledDataset(
        _GlyphImages(images, labels, uint8=False),
        spec=spec,
        split=split,
        num_classes=classes,
        in_channels=1,
        labels=labels.copy(),
        class_names=characters,
        transform_description=(
            f"glyphs: {count} samples of each of {classes} glyphs of matplotlib's fonts, "
            f"uint8 (1,{size},{size}) / 255, renderer version {RENDER_VERSION}"
        ),
        uint8_base=_GlyphImages(images, labels, uint8=True),
        normalization=PixelNormalization(255.0),
    )


class _GlyphImages(Dataset):
    """Items of a rendered split: the uint8 pixels, or the pixels / 255 as float32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, uint8: bool) -> None:
        self.images, self.labels, self.uint8 = images, labels, uint8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = torch.from_numpy(self.images[index].copy())
        return (pixels if self.uint8 else pixels.to(torch.float32).div_(255.0)), int(
            self.labels[index]
        )


@functools.cache
def glyph_samples(
    classes: int, size: int, per_class: int, split: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The images ``(N, 1, size, size)`` uint8, labels and class characters of one split, from
    the cache when it holds them, else drawn and cached (read-only arrays, shared in-process)."""
    count = per_class if split == "train" else TEST_PER_CLASS
    key = _cache_key(classes, size, count, split)
    path = cache_folder() / "glyphs" / f"glyphs-{classes}-{size}-{count}-{split}-{key[:20]}.npz"
    loaded = _load(path)
    if loaded is not None and not _fits(loaded, classes, size, count):
        loaded = None
    if loaded is None:
        characters = glyph_classes(classes)
        if len(characters) < classes:
            raise ConfigError(
                f"CLASSES={classes:,} of a glyphs dataset is out of range; matplotlib's fonts "
                f"hold {len(characters):,} distinct glyphs: expected 2 <= CLASSES <= "
                f"{len(characters):,}"
            )
        images = render_split(characters, size, count, split)
        labels = np.repeat(np.arange(classes, dtype=np.int64), count)
        codes = np.array([ord(c) for c in characters], dtype=np.int32)
        _save(path, images, labels, codes)
    else:
        images, labels, codes = loaded
        characters = tuple(chr(code) for code in codes)
    for array in (images, labels):
        array.setflags(write=False)
    return images, labels, characters


def render_split(characters: tuple[str, ...], size: int, count: int, split: str) -> np.ndarray:
    """``count`` samples of each character, class after class: ``(len * count, 1, size, size)``."""
    images = np.empty((len(characters) * count, 1, size, size), dtype=np.uint8)
    with one_torch_thread():
        for index, character in enumerate(characters):
            draws = sample_draws(split, character, count)
            images[index * count : (index + 1) * count, 0] = render_samples(
                character, draws, size=size
            )
    return images


def _cache_key(classes: int, size: int, count: int, split: str) -> str:
    from PIL import __version__ as pillow_version
    from PIL import features

    shaping = {
        "classes": classes,
        "size": size,
        "count": count,
        "split": split,
        "renderer": RENDER_VERSION,
        "fonts": font_digests(),
        "pillow": pillow_version,
        "freetype": features.version("freetype2"),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _digest(images: np.ndarray, labels: np.ndarray, codes: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, labels, codes):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A cached split, or None when there is none or it fails its digest (drawn again then)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels, codes = data["images"], data["labels"], data["codes"]
            recorded = str(data["sha256"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if recorded != _digest(images, labels, codes):
        return None
    return images, labels, codes


def _fits(
    loaded: tuple[np.ndarray, np.ndarray, np.ndarray], classes: int, size: int, count: int
) -> bool:
    """Whether a cached split has the shapes, labels and class characters its name promises: a
    file planted in a shared cache folder passes its own digest, so it is checked here too."""
    images, labels, codes = loaded
    return (
        images.dtype == np.uint8
        and images.shape == (classes * count, 1, size, size)
        and np.array_equal(labels, np.repeat(np.arange(classes, dtype=np.int64), count))
        and codes.shape == (classes,)
        and codes.dtype.kind in "iu"
        and bool(np.all((codes > 32) & (codes <= sys.maxunicode)))
        and np.unique(codes).size == classes
    )


def _save(path: Path, images: np.ndarray, labels: np.ndarray, codes: np.ndarray) -> None:
    """Publish the split whole or not at all: written to a new temporary, then renamed over.
    A cache that cannot be written leaves the dataset in memory only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".glyphs-", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                images=images,
                labels=labels,
                codes=codes,
                sha256=np.array(_digest(images, labels, codes)),
            )
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
