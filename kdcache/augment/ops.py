"""The operations of a recipe: their parameter fields, how to draw them in bulk, how to apply them.

Each operation draws the parameters of a whole batch of views at once from
:class:`~kdcache.augment.counter.Draws` (its own block of ``num_draws`` draw numbers), replays
one view's parameters with ``torchvision.transforms.v2.functional`` and says which stored values
it could never have drawn (:meth:`Op.problems`). This module holds the base class, the geometric
operations and mixing; :mod:`kdcache.augment.photometric` and :mod:`kdcache.augment.policies`
hold the colour operations and the learned policies.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from kdcache.augment.counter import BETA_DRAWS, Draws
from kdcache.errors import SpecError

Size = tuple[int, int]
#: (bad rows, column, what the column must hold): one rule a block of stored records breaks.
Problem = tuple[np.ndarray, int, str]
#: torchvision's RandomResizedCrop tries this many boxes before it falls back to a centre crop.
RRC_ATTEMPTS = 10


def text(value: float) -> str:
    """Shortest text that reads back as exactly ``value`` (canonical specs must re-parse equal)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def integral(values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are whole numbers."""
    return values == np.round(values)


@dataclass(frozen=True)
class PixelScale:
    """How a dataset's inputs relate to pixel values in [0, 1]: ``input = (pixel - mean) / std``
    per channel (torchvision's ``Normalize``); without ``mean``/``std`` the inputs are pixels.

    Colour operations (``Op.pixels``) run on pixels, as torchvision's expect of float images.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, dataset: object) -> PixelScale:
        """The scale of a dataset's float32 inputs, read from its ``normalization`` if it has one
        (:class:`kdcache.data.pixels.PixelNormalization`, whose divisor maps uint8 to [0, 1])."""
        normalization = getattr(dataset, "normalization", None)
        return cls(getattr(normalization, "mean", None), getattr(normalization, "std", None))

    def _per_channel(self, values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)

    def to_pixels(self, image: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return image
        return image * self._per_channel(self.std) + self._per_channel(self.mean)

    def to_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return pixels
        return (pixels - self._per_channel(self.mean)) / self._per_channel(self.std)


class Op(ABC):
    """One operation on a single image: its parameter fields, how to draw them, how to apply
    them, and which stored values it could not have drawn."""

    name: str
    fields: tuple[str, ...] = ()
    #: Draw numbers the operation owns in every record (a fixed block, used or not).
    num_draws: int = 0
    #: Whether the operation works on pixel values in [0, 1] (colour operations, as torchvision's
    #: expect) rather than on the dataset's inputs (geometry, erasing with normalised noise).
    pixels: bool = False
    #: The view-parameter layout version that introduced the operation (``augment.ops_version``).
    since: int = 1

    @abstractmethod
    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        """Parameters ``(len(draws), len(fields))`` (float64) for inputs of ``size`` (H, W)."""

    @abstractmethod
    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor: ...

    def out_size(self, size: Size) -> Size:
        return size

    def describe(self) -> str:
        return self.name

    @abstractmethod
    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        """The rules stored ``values`` (rows of this operation's columns) break for inputs of
        ``size``: a value outside what :meth:`draw` can produce."""


@dataclass(frozen=True)
class RandomResizedCrop(Op):
    """A box of random area share and aspect ratio, resized (bilinear, antialiased) to ``size``."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    size: int | None = None
    name = "rrc"
    fields = ("crop_top", "crop_left", "crop_height", "crop_width")
    # Attempt a uses draws 2a (area share) and 2a + 1 (log-ratio); then top and left.
    num_draws = 2 * RRC_ATTEMPTS + 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        # torchvision's RandomResizedCrop.get_params, for every view at once: attempt a is drawn
        # only for the views whose earlier attempts gave a box that does not fit.
        height, width = size
        low, high = self.scale
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        h, w = np.empty(len(draws)), np.empty(len(draws))
        pending: np.ndarray | None = None  # rows still without a box; None: every row
        for attempt in range(RRC_ATTEMPTS):
            share = low + (high - low) * draws.uniform(2 * attempt, pending)
            aspect = np.exp(
                log_low + (log_high - log_low) * draws.uniform(2 * attempt + 1, pending)
            )
            target = height * width * share
            try_w = np.round(np.sqrt(target * aspect))  # round half to even, as Python's round
            try_h = np.round(np.sqrt(target / aspect))
            fits = (try_w > 0) & (try_w <= width) & (try_h > 0) & (try_h <= height)
            # Every pending row takes this attempt's box; those that do not fit try again.
            rows = slice(None) if pending is None else pending
            h[rows], w[rows] = try_h, try_w
            pending = np.flatnonzero(~fits) if pending is None else pending[~fits]
            if not pending.size:
                break
        top = draws.integers(2 * RRC_ATTEMPTS, height - h + 1)
        left = draws.integers(2 * RRC_ATTEMPTS + 1, width - w + 1)
        assert pending is not None
        if pending.size:  # no attempt fitted: torchvision's centre crop
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                fw, fh = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                fh, fw = height, round(height * self.ratio[1])
            else:
                fw, fh = width, height
            top[pending], left[pending] = (height - fh) // 2, (width - fw) // 2
            h[pending], w[pending] = fh, fw
        return np.stack([top, left, h, w], axis=1)

    def out_size(self, size: Size) -> Size:
        return size if self.size is None else (self.size, self.size)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        top, left, h, w = (int(v) for v in values)
        out = list(self.out_size((image.shape[-2], image.shape[-1])))
        return TF.resized_crop(image, top, left, h, w, out, antialias=True)

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        height, width = size
        whole = integral(values)
        top, left, h, w = values.T
        return [
            (~whole[:, 2] | (h < 1) | (h > height), 2, f"an integer from 1 to {height}"),
            (~whole[:, 3] | (w < 1) | (w > width), 3, f"an integer from 1 to {width}"),
            (~whole[:, 0] | (top < 0) | (top + h > height), 0, "a crop inside the image"),
            (~whole[:, 1] | (left < 0) | (left + w > width), 1, "a crop inside the image"),
        ]

    def describe(self) -> str:
        size = "" if self.size is None else f",size={self.size}"
        scale, ratio = (f"{text(a)}-{text(b)}" for a, b in (self.scale, self.ratio))
        return f"rrc:scale={scale},ratio={ratio}{size}"


@dataclass(frozen=True)
class PadCrop(Op):
    """Zero-pad ``padding`` pixels on every side, then crop the input's size at a random offset."""

    padding: int = 4
    name = "pad-crop"
    fields = ("pad_top", "pad_left")
    num_draws = 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        span = 2 * self.padding + 1
        return np.stack([draws.integers(0, span), draws.integers(1, span)], axis=1)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        top, left = (int(v) for v in values)
        height, width = image.shape[-2], image.shape[-1]
        padded = TF.pad(image, [self.padding], fill=0.0)
        return TF.crop(padded, top, left, height, width)

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        span = 2 * self.padding
        whole = integral(values)
        return [
            (
                ~whole[:, c] | (values[:, c] < 0) | (values[:, c] > span),
                c,
                f"an integer from 0 to {span}",
            )
            for c in (0, 1)
        ]

    def describe(self) -> str:
        return f"pad-crop:{self.padding}"


@dataclass(frozen=True)
class Flip(Op):
    """Mirror left-right with probability ``p``."""

    p: float = 0.5
    name = "flip"
    fields = ("flip",)
    num_draws = 1

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        return (draws.uniform(0) < self.p).astype(np.float64)[:, None]

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        return TF.horizontal_flip(image) if values[0] else image

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        return [(~np.isin(values[:, 0], (0.0, 1.0)), 0, "0 or 1")]

    def describe(self) -> str:
        return "flip" if self.p == 0.5 else f"flip:{text(self.p)}"


@dataclass(frozen=True)
class Mix:
    """Mixup (``lam * x + (1 - lam) * x_partner``) or CutMix (a box of the partner pasted in).

    The partner is another sample, drawn uniformly; ``lam`` is the share of the sample's own
    pixels (CutMix: one minus the box's area share, after clipping the box to the image).
    """

    kind: str = "mixup"
    alpha: float = 1.0

    @property
    def fields(self) -> tuple[str, ...]:
        box = ("box_top", "box_left", "box_height", "box_width") if self.kind == "cutmix" else ()
        return ("partner", "lam", *box)

    @property
    def num_draws(self) -> int:
        """Draw 0: the partner; 1 .. BETA_DRAWS: lam; CutMix then the box centre (y, x)."""
        return 1 + BETA_DRAWS + (2 if self.kind == "cutmix" else 0)

    def draw(self, draws: Draws, size: Size, index: np.ndarray, n: int) -> np.ndarray:
        """Parameters of the views of samples ``index`` (of ``n``) for inputs of ``size``."""
        if n > 1:
            partner = draws.integers(0, n - 1)
            partner += partner >= index  # uniform over the other samples
        else:
            partner = index.astype(np.float64)
        lam = draws.beta(1, self.alpha)
        if self.kind == "mixup":
            return np.stack([partner, lam], axis=1)
        height, width = size
        cut = np.sqrt(1.0 - lam)
        # Half the cut's height and width, rounded down (floor of an exact half: cheaper than //).
        half_h, half_w = (
            np.floor(np.floor(height * cut) * 0.5),
            np.floor(np.floor(width * cut) * 0.5),
        )
        cy = draws.integers(1 + BETA_DRAWS, height)
        cx = draws.integers(2 + BETA_DRAWS, width)
        top, bottom = np.maximum(cy - half_h, 0), np.minimum(cy + half_h, height)
        left, right = np.maximum(cx - half_w, 0), np.minimum(cx + half_w, width)
        box_h, box_w = bottom - top, right - left
        lam = 1.0 - box_h * box_w / (height * width)
        return np.stack([partner, lam, top, left, box_h, box_w], axis=1)

    def mix(self, image: torch.Tensor, partner: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        if partner.shape != image.shape:
            raise SpecError(
                f"{self.kind} needs inputs of one size, got {tuple(image.shape)} and "
                f"{tuple(partner.shape)}; use a dataset whose inputs share their size"
            )
        if self.kind == "mixup":
            lam = torch.tensor(float(values[1]), dtype=image.dtype)
            return lam * image + (1 - lam) * partner
        top, left, h, w = (int(v) for v in values[2:6])
        mixed = image.clone()
        mixed[..., top : top + h, left : left + w] = partner[..., top : top + h, left : left + w]
        return mixed

    def problems(
        self, values: np.ndarray, size: Size, index: np.ndarray, num_samples: int
    ) -> list[Problem]:
        """As :meth:`Op.problems`, for the views of samples ``index`` (of ``num_samples``)."""
        height, width = size
        whole = integral(values)
        partner, lam = values[:, 0], values[:, 1]
        bad = ~whole[:, 0] | (partner < 0) | (partner >= num_samples)
        if num_samples > 1:  # a single sample is its own partner
            bad |= partner == index
        rules = [
            (bad, 0, f"another sample's index in [0, {num_samples})"),
            (~((lam >= 0) & (lam <= 1)), 1, "from 0 to 1"),
        ]
        if self.kind == "cutmix":
            top, left, h, w = values[:, 2:6].T
            inside = (top >= 0) & (left >= 0) & (h >= 0) & (w >= 0)
            inside &= (top + h <= height) & (left + w <= width)
            rules.append((~whole[:, 2:6].all(axis=1) | ~inside, 2, "a box inside the image"))
        return rules

    def describe(self) -> str:
        return f"{self.kind}:{text(self.alpha)}"
