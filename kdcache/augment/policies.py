"""RandAugment, TrivialAugmentWide and AutoAugment's ImageNet policy, replayed op by op.

torchvision's three policies pick image transforms and magnitudes at random; here each picked
transform is stored as a slot of two fields: ``..._op``, the transform's position in
:data:`TRANSFORMS`, and ``..._magnitude``, the signed magnitude torchvision passes to it (a
float32 from the same ``torch.linspace`` tables, so stored exactly). A slot whose transform was
not applied (AutoAugment's probabilities) stores ``Identity`` with magnitude 0. Replay calls
``torchvision.transforms.v2.functional`` as torchvision's ``_AutoAugmentBase`` does (nearest
interpolation, fill 0), on pixels in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from kdcache.augment.counter import Draws
from kdcache.augment.ops import Op, Problem, Size, integral

#: Every transform a policy may store, by the index its ``..._op`` field holds (fixed: stores
#: record these numbers).
TRANSFORMS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
#: A transform's magnitudes over ``bins`` bins for an input of (height, width); None: no
#: magnitude.
Magnitudes = Callable[[int, int, int], torch.Tensor | None]
#: A policy's transforms: their magnitudes and whether a magnitude is negated half the time.
Space = dict[str, tuple[Magnitudes, bool]]


def _linspace(high: float) -> Magnitudes:
    return lambda bins, height, width: torch.linspace(0.0, high, bins)


def _none(bins: int, height: int, width: int) -> None:
    return None


def _posterize(levels: int) -> Magnitudes:
    return lambda bins, height, width: (
        (8 - (torch.arange(bins) / ((bins - 1) / levels))).round().int()
    )


def _solarize(bins: int, height: int, width: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, bins)


# The tables of torchvision's transforms.v2 RandAugment, AutoAugment and TrivialAugmentWide.
RAND_AUGMENT: Space = {
    "Identity": (_none, False),
    "ShearX": (_linspace(0.3), True),
    "ShearY": (_linspace(0.3), True),
    "TranslateX": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True),
    "TranslateY": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True),
    "Rotate": (_linspace(30.0), True),
    "Brightness": (_linspace(0.9), True),
    "Color": (_linspace(0.9), True),
    "Contrast": (_linspace(0.9), True),
    "Sharpness": (_linspace(0.9), True),
    "Posterize": (_posterize(4), False),
    "Solarize": (_solarize, False),
    "AutoContrast": (_none, False),
    "Equalize": (_none, False),
}
AUTO_AUGMENT: Space = {
    **{name: space for name, space in RAND_AUGMENT.items() if name != "Identity"},
    "Invert": (_none, False),
}
TRIVIAL_AUGMENT_WIDE: Space = {
    "Identity": (_none, False),
    "ShearX": (_linspace(0.99), True),
    "ShearY": (_linspace(0.99), True),
    "TranslateX": (_linspace(32.0), True),
    "TranslateY": (_linspace(32.0), True),
    "Rotate": (_linspace(135.0), True),
    "Brightness": (_linspace(0.99), True),
    "Color": (_linspace(0.99), True),
    "Contrast": (_linspace(0.99), True),
    "Sharpness": (_linspace(0.99), True),
    "Posterize": (_posterize(6), False),
    "Solarize": (_solarize, False),
    "AutoContrast": (_none, False),
    "Equalize": (_none, False),
}
#: AutoAugment's ImageNet policy (Cubuk et al. 2019, as torchvision has it): 25 sub-policies of
#: two (transform, probability, magnitude bin of 10) each.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
#: AutoAugment's magnitude bins.
AUTO_AUGMENT_BINS = 10


@cache
def magnitude_table(space_name: str, bins: int, size: Size) -> np.ndarray:
    """``(len(TRANSFORMS), bins)`` float64: the magnitudes of each transform of a space (0 for a
    transform without magnitudes or outside the space), exactly torchvision's float32 values."""
    space = SPACES[space_name]
    table = np.zeros((len(TRANSFORMS), bins))
    for name, (magnitudes, _) in space.items():
        values = magnitudes(bins, *size)
        if values is not None:
            table[TRANSFORMS.index(name)] = values.to(torch.float32).numpy()
    return table


SPACES = {
    "randaugment": RAND_AUGMENT,
    "autoaugment": AUTO_AUGMENT,
    "trivialaugment": TRIVIAL_AUGMENT_WIDE,
}


def _signed(space: Space) -> np.ndarray:
    """Per transform index: whether the space negates its magnitude half the time."""
    signed = np.zeros(len(TRANSFORMS), dtype=bool)
    for name, (_, is_signed) in space.items():
        signed[TRANSFORMS.index(name)] = is_signed
    return signed


def apply_transform(image: torch.Tensor, transform: str, magnitude: float) -> torch.Tensor:
    """One transform at one magnitude, as torchvision's ``_apply_image_or_video_transform`` with
    nearest interpolation and fill 0, on a float image of pixels in [0, 1]."""
    nearest = TF.InterpolationMode.NEAREST
    if transform == "Identity":
        return image
    if transform in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        shear = [angle, 0.0] if transform == "ShearX" else [0.0, angle]
        return TF.affine(
            image,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=nearest,
            fill=None,
            center=[0, 0],
        )
    if transform in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if transform == "TranslateX" else [0, int(magnitude)]
        return TF.affine(
            image,
            angle=0.0,
            translate=shift,
            scale=1.0,
            interpolation=nearest,
            shear=[0.0, 0.0],
            fill=None,
        )
    if transform == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=nearest, fill=None)
    if transform == "Brightness":
        return TF.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if transform == "Color":
        return TF.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if transform == "Contrast":
        return TF.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if transform == "Sharpness":
        return TF.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if transform == "Posterize":
        return TF.posterize(image, bits=int(magnitude))
    if transform == "Solarize":
        return TF.solarize(image, threshold=1.0 * magnitude)  # float images: bound 1.0
    if transform == "AutoContrast":
        return TF.autocontrast(image)
    if transform == "Equalize":
        return TF.equalize(image)
    assert transform == "Invert"
    return TF.invert(image)


def _slot_fields(prefix: str, slots: int) -> tuple[str, ...]:
    if slots == 1:
        return (f"{prefix}_op", f"{prefix}_magnitude")
    return tuple(f"{prefix}_{kind}_{k + 1}" for k in range(slots) for kind in ("op", "magnitude"))


def _negate(magnitude: np.ndarray, signed: np.ndarray, u: np.ndarray) -> np.ndarray:
    """torchvision's ``if signed and torch.rand(()) <= 0.5: magnitude *= -1``."""
    return np.where(signed & (u <= 0.5), -magnitude, magnitude)


def _apply_slots(image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
    for op, magnitude in values.reshape(-1, 2):
        image = apply_transform(image, TRANSFORMS[int(op)], float(magnitude))
    return image


def _slot_problems(
    values: np.ndarray, column: int, allowed: np.ndarray, magnitudes: np.ndarray, signed: np.ndarray
) -> list[Problem]:
    """Rules for the slot at ``column``: its op one of ``allowed`` (per row, a boolean matrix
    over :data:`TRANSFORMS`), its magnitude that op's ``magnitudes`` (per row, over bins; NaN
    pads), negated only where the op is ``signed``."""
    op = values[:, column]
    magnitude = values[:, column + 1].astype(np.float64)
    index = np.where(integral(op) & (op >= 0) & (op < len(TRANSFORMS)), op, 0).astype(np.int64)
    rows = np.arange(len(values))
    bad_op = ~integral(op) | (op < 0) | (op >= len(TRANSFORMS)) | ~allowed[rows, index]
    size = np.abs(magnitude)
    matches = (magnitudes[rows, index] == size[:, None]).any(axis=1)
    bad_magnitude = ~matches | ((magnitude < 0) & ~signed[index])
    return [
        (bad_op, column, "a transform this policy picks (docs/augmentation.md)"),
        (bad_op | bad_magnitude, column + 1, "a magnitude of the stored transform"),
    ]


@dataclass(frozen=True)
class RandAugment(Op):
    """torchvision's RandAugment (Cubuk et al. 2020): ``num_ops`` transforms drawn uniformly
    from its 14, each at magnitude bin ``magnitude`` of ``bins`` (torchvision: 31 bins; 11 bins
    put the magnitude on timm's 0-10 scale)."""

    num_ops: int = 2
    magnitude: int = 9
    bins: int = 31
    name = "randaugment"
    pixels = True
    since = 2

    @property
    def fields(self) -> tuple[str, ...]:  # type: ignore[override]
        return _slot_fields("ra", self.num_ops)

    @property
    def num_draws(self) -> int:  # type: ignore[override]
        return 2 * self.num_ops  # per slot: the transform, the sign

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        table = magnitude_table("randaugment", self.bins, size)
        choices = np.array([TRANSFORMS.index(name) for name in RAND_AUGMENT])
        signed = _signed(RAND_AUGMENT)
        columns = []
        for slot in range(self.num_ops):
            op = choices[draws.integers(2 * slot, len(choices)).astype(np.int64)]
            magnitude = table[op, self.magnitude]
            columns += [op, _negate(magnitude, signed[op], draws.uniform(2 * slot + 1))]
        return np.stack(columns, axis=1).astype(np.float64)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        return _apply_slots(image, values)

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        table = magnitude_table("randaugment", self.bins, size)[
            :, self.magnitude : self.magnitude + 1
        ]
        allowed = np.zeros(len(TRANSFORMS), dtype=bool)
        allowed[[TRANSFORMS.index(name) for name in RAND_AUGMENT]] = True
        rows = len(values)
        rules = []
        for slot in range(self.num_ops):
            rules += _slot_problems(
                values,
                2 * slot,
                np.broadcast_to(allowed, (rows, len(TRANSFORMS))),
                np.broadcast_to(table, (rows, *table.shape)),
                _signed(RAND_AUGMENT),
            )
        return rules

    def describe(self) -> str:
        bins = "" if self.bins == 31 else f",bins={self.bins}"
        return f"randaugment:{self.num_ops},{self.magnitude}{bins}"


@dataclass(frozen=True)
class TrivialAugmentWide(Op):
    """torchvision's TrivialAugmentWide (Müller & Hutter 2021): one transform drawn uniformly
    from its 14, at a magnitude bin drawn uniformly from ``bins``."""

    bins: int = 31
    name = "trivialaugment"
    fields = _slot_fields("ta", 1)
    num_draws = 3  # the transform, the magnitude bin, the sign
    pixels = True
    since = 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        table = magnitude_table("trivialaugment", self.bins, size)
        choices = np.array([TRANSFORMS.index(name) for name in TRIVIAL_AUGMENT_WIDE])
        op = choices[draws.integers(0, len(choices)).astype(np.int64)]
        magnitude = table[op, draws.integers(1, self.bins).astype(np.int64)]
        signed = _signed(TRIVIAL_AUGMENT_WIDE)[op]
        return np.stack([op, _negate(magnitude, signed, draws.uniform(2))], axis=1).astype(
            np.float64
        )

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        return _apply_slots(image, values)

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        table = magnitude_table("trivialaugment", self.bins, size)
        allowed = np.zeros(len(TRANSFORMS), dtype=bool)
        allowed[[TRANSFORMS.index(name) for name in TRIVIAL_AUGMENT_WIDE]] = True
        rows = len(values)
        return _slot_problems(
            values,
            0,
            np.broadcast_to(allowed, (rows, len(TRANSFORMS))),
            np.broadcast_to(table, (rows, *table.shape)),
            _signed(TRIVIAL_AUGMENT_WIDE),
        )

    def describe(self) -> str:
        return "trivialaugment" if self.bins == 31 else f"trivialaugment:{self.bins}"


def _policy_tables(size: Size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sub-policy and slot: the transform index, its probability and its magnitude."""
    table = magnitude_table("autoaugment", AUTO_AUGMENT_BINS, size)
    ops = np.array([[TRANSFORMS.index(t) for t, _, _ in sub] for sub in IMAGENET_POLICY])
    probability = np.array([[p for _, p, _ in sub] for sub in IMAGENET_POLICY])
    magnitude = np.array(
        [
            [0.0 if b is None else table[TRANSFORMS.index(t), b] for t, _, b in sub]
            for sub in IMAGENET_POLICY
        ]
    )
    return ops, probability, magnitude


@dataclass(frozen=True)
class AutoAugment(Op):
    """torchvision's AutoAugment with the ImageNet policy: one of 25 sub-policies drawn
    uniformly, each of its two transforms applied with its own probability; ``aa_policy`` stores
    the sub-policy, each slot its transform (Identity where it was not applied)."""

    name = "autoaugment"
    fields = ("aa_policy", *_slot_fields("aa", 2))
    num_draws = 5  # the sub-policy, then per slot whether it applies and its sign
    pixels = True
    since = 2

    def draw(self, draws: Draws, size: Size) -> np.ndarray:
        ops, probability, magnitudes = _policy_tables(size)
        signed = _signed(AUTO_AUGMENT)
        policy = draws.integers(0, len(IMAGENET_POLICY)).astype(np.int64)
        columns = [policy.astype(np.float64)]
        for slot in range(2):
            # torchvision: ``if not torch.rand(()) <= probability: continue``.
            applied = draws.uniform(1 + 2 * slot) <= probability[policy, slot]
            op = ops[policy, slot]
            magnitude = _negate(magnitudes[policy, slot], signed[op], draws.uniform(2 + 2 * slot))
            columns += [np.where(applied, op, 0), np.where(applied, magnitude, 0.0)]
        return np.stack(columns, axis=1).astype(np.float64)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        return _apply_slots(image, values[1:])

    def problems(self, values: np.ndarray, size: Size) -> list[Problem]:
        ops, _, magnitudes = _policy_tables(size)
        policy = values[:, 0]
        valid = integral(policy) & (policy >= 0) & (policy < len(IMAGENET_POLICY))
        rules: list[Problem] = [(~valid, 0, f"an integer from 0 to {len(IMAGENET_POLICY) - 1}")]
        index = np.where(valid, policy, 0).astype(np.int64)
        rows = np.arange(len(values))
        for slot in range(2):
            allowed = np.zeros((len(values), len(TRANSFORMS)), dtype=bool)
            allowed[rows, 0] = True  # not applied
            allowed[rows, ops[index, slot]] = True
            # Identity stores 0; the policy's transform its magnitude.
            table = np.zeros((len(values), len(TRANSFORMS), 1))
            table[rows, ops[index, slot], 0] = magnitudes[index, slot]
            for bad, column, expected in _slot_problems(
                values[:, 1:], 2 * slot, allowed, table, _signed(AUTO_AUGMENT)
            ):
                rules.append((bad | ~valid, column + 1, expected))
        return rules

    def describe(self) -> str:
        return "autoaugment"
