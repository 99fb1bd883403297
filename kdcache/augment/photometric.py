"""Colour operations and random erasing: colour jitter, grayscale, Gaussian blur, erasing.

Each stores what recreates its effect exactly (the jitter's factors and their order, whether the
image turned gray, the blur's sigma, the erased box and the seed of its noise) and replays it
with ``torchvision.transforms.v2.functional``, following torchvision's ``ColorJitter``,
``RandomGrayscale``, ``GaussianBlur`` and ``RandomErasing`` (timm's ``RandomErasing`` with
``mode='pixel'`` for ``value=random``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from kdcache.augment.counter import Draws
from kdcache.augment.ops import Op, Problem, Size, integral, text
from kdcache.errors import SpecError

#: The 24 orders of ColorJitter's four adjustments (brightness, contrast, saturation, hue), by
#: index: ``jitter_order`` stores the position of the drawn order in this list.
JITTER_ORDERS = tuple(itertools.permutations(range(4)))
#: torchvision's RandomErasing tries this many boxes before it leaves the image as it is.
ERASE_ATTEMPTS = 10
#: ``erase_noise`` seeds are integers below 2^24, exact in a float32 record.
NOISE_SEEDS = 1 << 24


def _within(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Which float32 ``values`` lie in [low, high] once the bounds are rounded to float32 too."""
    return (values >= np.float32(low)) & (values <= np.float32(high))


@dataclass(frozen=True)
class ColorJitter(Op):
    """torchvision's ColorJitter: brightness, contrast and saturation factors uniform in
    ``[max(0, 1 - x), 1 + x]``, a hue shift uniform in ``[-hue, hue]``, applied in a random order;
    a zero strength leaves that adjustment out (no field, no call)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    name = "jitter"
    num_draws = 5  # the order, then one draw per adjustment
    pixels = True
    since = 2

    @property
    def strengths(self) -> tuple[float, float, float, float]:
        return (self.brightness, self.contrast, self.saturation, self.hue)

    @property
    def fields(self) -> tuple[str, ...]:  # type: ignore[override]
        names = ("jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue")
        return ("jitter_order", *(n for n, s in zip(names, self.strengths, strict=True) if s))

    def _range(self, adjustment: int) -> tuple[float, float]:
        strength = self.strengths[adjustment]
        return (-strength, strength) if adjustment == 3 else (max(0.0, 1 - strength), 1 + strength)

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        columns = [draws.integers(0, len(JITTER_ORDERS))]
        for adjustment, strength in enumerate(self.strengths):
            if strength:
                low, high = self._range(adjustment)
                columns.append(low + (high - low) * draws.uniform(1 + adjustment))
        return np.stack(columns, axis=1)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        factors = iter(float(v) for v in values[1:])
        by_adjustment = {a: next(factors) for a, s in enumerate(self.strengths) if s}
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for adjustment in JITTER_ORDERS[int(values[0])]:
            if adjustment in by_adjustment:
                image = adjust[adjustment](image, by_adjustment[adjustment])
        return image

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        order = values[:, 0]
        bad_order = ~integral(order) | (order < 0) | (order >= len(JITTER_ORDERS))
        rules: list[Problem] = [(bad_order, 0, f"an integer from 0 to {len(JITTER_ORDERS) - 1}")]
        column = 1
        for adjustment, strength in enumerate(self.strengths):
            if strength:
                low, high = self._range(adjustment)
                rules.append(
                    (~_within(values[:, column], low, high), column, f"from {low:g} to {high:g}")
                )
                column += 1
        return rules

    def describe(self) -> str:
        return "jitter:" + ",".join(text(s) for s in self.strengths)


@dataclass(frozen=True)
class Grayscale(Op):
    """torchvision's RandomGrayscale: with probability ``p`` the image's luma in every channel."""

    p: float = 0.1
    name = "gray"
    fields = ("gray",)
    num_draws = 1
    pixels = True
    since = 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        return (draws.uniform(0) < self.p).astype(np.float64)[:, None]

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        if not values[0] or image.shape[-3] == 1:
            return image
        return TF.rgb_to_grayscale(image, num_output_channels=image.shape[-3])

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        return [(~np.isin(values[:, 0], (0.0, 1.0)), 0, "0 or 1")]

    def describe(self) -> str:
        return f"gray:{text(self.p)}"


@dataclass(frozen=True)
class GaussianBlur(Op):
    """torchvision's GaussianBlur (a ``kernel`` x ``kernel`` window, sigma uniform in ``sigma``),
    applied with probability ``p``; ``blur_sigma`` 0 stores a view left sharp."""

    kernel: int = 5
    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 1.0
    name = "blur"
    fields = ("blur_sigma",)
    num_draws = 2
    pixels = True
    since = 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        if self.kernel // 2 >= min(size):  # torchvision pads by reflection: less than a side
            raise SpecError(
                f"blur:{self.kernel} needs inputs of more than {self.kernel // 2} pixels a side, "
                f"got {size[0]} x {size[1]}; use a kernel below {2 * min(size)}"
            )
        low, high = self.sigma
        sigma = low + (high - low) * draws.uniform(1)
        return np.where(draws.uniform(0) < self.p, sigma, 0.0)[:, None]

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        sigma = float(values[0])
        if not sigma:
            return image
        return TF.gaussian_blur(image, [self.kernel, self.kernel], [sigma, sigma])

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        sigma = values[:, 0]
        bad = ~(_within(sigma, *self.sigma) | (sigma == 0))
        return [(bad, 0, f"0 or from {self.sigma[0]:g} to {self.sigma[1]:g}")]

    def describe(self) -> str:
        low, high = self.sigma
        return f"blur:{self.kernel},sigma={text(low)}-{text(high)},p={text(self.p)}"


@dataclass(frozen=True)
class RandomErasing(Op):
    """torchvision's RandomErasing: with probability ``p`` a box of area share in ``scale`` and
    aspect ratio (log-uniform) in ``ratio`` is overwritten, on the dataset's (normalised) inputs.

    ``value`` is the constant written, or ``None`` for standard-normal noise per pixel (timm's
    ``mode='pixel'``), drawn by ``torch.randn`` from a generator seeded with ``erase_noise``. A
    view not erased (not drawn, or no box fitted in 10 attempts) stores a 0 x 0 box.
    """

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float | None = 0.0
    name = "erase"
    # Draw 0: whether to erase; attempt a uses 1 + 2a (area share) and 2 + 2a (log-ratio); then
    # top, left and the noise seed.
    num_draws = 2 * ERASE_ATTEMPTS + 4
    since = 2

    @property
    def fields(self) -> tuple[str, ...]:  # type: ignore[override]
        box = ("erase_top", "erase_left", "erase_height", "erase_width")
        return box if self.value is not None else (*box, "erase_noise")

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        # torchvision's RandomErasing.get_params for every view at once, as RandomResizedCrop.
        height, width = size
        low, high = self.scale
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        h, w = np.zeros(len(draws)), np.zeros(len(draws))
        pending = np.flatnonzero(draws.uniform(0) < self.p)  # erased views still without a box
        for attempt in range(ERASE_ATTEMPTS):
            if not pending.size:
                break
            area = height * width * (low + (high - low) * draws.uniform(1 + 2 * attempt, pending))
            aspect = np.exp(
                log_low + (log_high - log_low) * draws.uniform(2 + 2 * attempt, pending)
            )
            try_h = np.round(np.sqrt(area * aspect))  # round half to even, as Python's round
            try_w = np.round(np.sqrt(area / aspect))
            fits = (try_h < height) & (try_w < width)
            h[pending[fits]], w[pending[fits]] = try_h[fits], try_w[fits]
            pending = pending[~fits]
        top = draws.integers(1 + 2 * ERASE_ATTEMPTS, height - h + 1)
        left = draws.integers(2 + 2 * ERASE_ATTEMPTS, width - w + 1)
        erased = (h > 0) & (w > 0)
        top, left = np.where(erased, top, 0), np.where(erased, left, 0)
        h, w = np.where(erased, h, 0), np.where(erased, w, 0)
        columns = [top, left, h, w]
        if self.value is None:
            noise = draws.integers(3 + 2 * ERASE_ATTEMPTS, NOISE_SEEDS)
            columns.append(np.where(erased, noise, 0))
        return np.stack(columns, axis=1)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        top, left, h, w = (int(v) for v in values[:4])
        if not (h and w):
            return image
        shape = (image.shape[-3], h, w)
        if self.value is None:
            generator = torch.Generator().manual_seed(int(values[4]))
            fill = torch.randn(shape, generator=generator, dtype=image.dtype)
        else:
            fill = torch.full(shape, self.value, dtype=image.dtype)
        return TF.erase(image, top, left, h, w, fill)

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        height, width = size
        whole = integral(values)
        top, left, h, w = values[:, :4].T
        empty = (top == 0) & (left == 0) & (h == 0) & (w == 0)
        box = whole[:, :4].all(axis=1) & (h >= 1) & (h < height) & (w >= 1) & (w < width)
        box &= (top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)
        rules: list[Problem] = [
            (~(empty | box), 2, f"0, or a box inside the image smaller than {height} x {width}")
        ]
        if self.value is None:
            noise = values[:, 4]
            bad = ~whole[:, 4] | (noise < 0) | (noise >= NOISE_SEEDS) | (empty & (noise != 0))
            rules.append((bad, 4, f"an integer from 0 to {NOISE_SEEDS - 1} (0 if not erased)"))
        return rules

    def describe(self) -> str:
        value = "random" if self.value is None else text(self.value)
        scale, ratio = (f"{text(a)}-{text(b)}" for a, b in (self.scale, self.ratio))
        return f"erase:{text(self.p)},scale={scale},ratio={ratio},value={value}"
