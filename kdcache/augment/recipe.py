"""Augmentation recipes: a spec string, per-view parameters drawn from a seed, and their replay.

A recipe is a ``+``-separated list of operations applied in order to a dataset's input tensor
``(C, H, W)``; each operation is ``NAME`` or ``NAME:ARGS`` with comma-separated arguments,
positional or ``key=value``, and ranges written ``LOW-HIGH``::

    rrc:scale=0.35-1,ratio=0.75-1.33+flip     random-resized crop, then a horizontal flip
    pad-crop:4+flip                           the CIFAR recipe: pad 4 pixels, crop back, flip
    rrc+flip+mixup:0.2                        each image and a partner cropped and flipped
                                              independently, then mixed (Beyer et al. 2022)
    pad-crop:4+flip+cutmix:1.0                as above, a box of the partner pasted in

Operations (see docs/augmentation.md): ``rrc[:scale=A-B,ratio=A-B,size=S]`` (defaults 0.08-1,
0.75-1.3333, output the input's size), ``pad-crop:P`` (P zero pixels on every side, cropped
back to the input's size), ``flip[:P]`` (horizontal, probability P = 0.5), the colour operations
``jitter``, ``gray``, ``blur``, the policies ``randaugment:N,M``, ``trivialaugment``,
``autoaugment``, random erasing ``erase:P``, and as the last operation at most one of
``mixup:ALPHA`` or ``cutmix:ALPHA`` (lambda ~ Beta(ALPHA, ALPHA)). A preset's name
(:data:`~kdcache.augment.catalog.PRESETS`, e.g. ``deit``) stands for its operations.

Every view of every sample has a fixed-width float32 parameter record (:attr:`Recipe.fields`)
drawn by :meth:`Recipe.sample_table` (or :meth:`Recipe.sample`, one row of it, through the same
code) from the counter-based generator :data:`SAMPLER` (:mod:`kdcache.augment.counter`): a pure
function of ``(seed, stream, sample, view)`` (and of N and the input size), drawn in bulk, so any
process and any chunking draws the same views. The draw numbers of a record are laid out in
recipe order: each image operation's block (``num_draws``: rrc 22, pad-crop 2, flip 1, ...),
then the mixing operation's (mixup 18, cutmix 20), then the partner's image operation blocks.
:meth:`Recipe.apply` replays a record with ``torchvision.transforms.v2.functional``; the dump,
the cached run and the online run all go through it, so the same record gives the same pixels,
bit for bit on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.augment.catalog import PRESETS
from kdcache.augment.counter import NAME as SAMPLER
from kdcache.augment.counter import Draws
from kdcache.augment.ops import Flip, Mix, Op, PadCrop, PixelScale, RandomResizedCrop, Size
from kdcache.augment.photometric import ColorJitter, GaussianBlur, Grayscale, RandomErasing
from kdcache.augment.policies import AutoAugment, RandAugment, TrivialAugmentWide
from kdcache.errors import SpecError
from kdcache.wording import counted

__all__ = [
    "OPERATIONS",
    "OPS_VERSION",
    "SAMPLER",
    "STUDENT_STREAM",
    "VIEW_STREAM",
    "Recipe",
    "parse_recipe",
]

#: Stream tags in the generator key: stored views and student-only augmentation never share draws.
VIEW_STREAM, STUDENT_STREAM = 0, 1
#: Records drawn per batch by :meth:`Recipe.sample_table`: bounds its temporaries (~100 MB).
CHUNK_ROWS = 1 << 16
#: The largest side ``rrc:size=S`` resizes to (a 4096-pixel RGB view is already 200 MB in float32).
MAX_SIZE = 4096
#: The most zero pixels ``pad-crop:P`` pads each side with, a quarter of :data:`MAX_SIZE`: more
#: would make whole views of padding, and the padded image is allocated before it is cropped.
MAX_PADDING = MAX_SIZE // 4
#: The newest view-parameter layout this kdcache reads and writes: 1 knows rrc, pad-crop, flip,
#: mixup and cutmix; 2 adds the colour operations, the policies and erasing. A store records the
#: layout its recipe needs (``augment.ops_version``, absent for 1).
OPS_VERSION = 2
#: The most transforms ``randaugment:N`` chains, and the most magnitude bins it takes.
MAX_RAND_OPS, MAX_BINS = 16, 1000
#: The largest Gaussian blur window (pixels per side); windows are odd.
MAX_KERNEL = 1023


def _count(value: str, *, high: int) -> int | None:
    """``value`` as an integer from 1 to ``high``, else None (checked as text: no huge ints)."""
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(high)):
        return None
    number = int(value)
    return number if 1 <= number <= high else None


def _numbers(text: str, spec: str, what: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        values = (float(low), float(high)) if sep else (float(low), float(low))
    except ValueError:
        raise SpecError(
            f"cannot read {what}={text!r} in recipe {spec!r}; expected a number or LOW-HIGH, "
            "e.g. scale=0.35-1"
        ) from None
    if not all(math.isfinite(v) for v in values) or values[0] > values[1]:
        raise SpecError(f"{what}={text!r} in recipe {spec!r} must be finite with LOW <= HIGH")
    return values


def _rrc(named: dict[str, str], positional: list[str], spec: str) -> Op:
    scale = _numbers(named.get("scale", "0.08-1"), spec, "scale")
    ratio = _numbers(named.get("ratio", "0.75-1.3333333"), spec, "ratio")
    if not (scale[0] > 0 and scale[1] <= 1 and ratio[0] > 0):
        raise SpecError(f"rrc in {spec!r} needs 0 < scale <= 1 and ratio > 0")
    size = named.get("size")
    pixels = None if size is None else _count(size, high=MAX_SIZE)
    if size is not None and pixels is None:
        raise SpecError(
            f"rrc size={size!r} in {spec!r} must be an integer from 1 to {MAX_SIZE:,} (the side "
            "of the square view, in pixels)"
        )
    return RandomResizedCrop(scale=scale, ratio=ratio, size=pixels)


def _pad_crop(named: dict[str, str], positional: list[str], spec: str) -> Op:
    value = named.get("padding", positional[0] if positional else "4")
    padding = _count(value, high=MAX_PADDING)
    if padding is None:
        raise SpecError(
            f"pad-crop:{value} in {spec!r}: padding must be an integer from 1 to {MAX_PADDING:,} "
            "(zero pixels on each side, e.g. pad-crop:4)"
        )
    return PadCrop(padding=padding)


def _flip(named: dict[str, str], positional: list[str], spec: str) -> Op:
    p = _numbers(named.get("p", positional[0] if positional else "0.5"), spec, "p")[0]
    if not 0 <= p <= 1:
        raise SpecError(f"flip probability {p} in {spec!r} must lie in [0, 1]")
    return Flip(p=p)


def _probability(
    named: dict[str, str], positional: list[str], spec: str, op: str, default: str
) -> float:
    p = _numbers(named.get("p", positional[0] if positional else default), spec, "p")[0]
    if not 0 <= p <= 1:
        raise SpecError(f"{op} probability {p} in {spec!r} must lie in [0, 1]")
    return p


def _integer(value: str, spec: str, what: str, *, low: int, high: int) -> int:
    """``value`` as an integer from ``low`` to ``high`` (checked as text: no huge ints)."""
    number = int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else None
    if number is None or not low <= number <= high:
        raise SpecError(
            f"{what}={value!r} in recipe {spec!r} must be an integer from {low} to {high:,}"
        )
    return number


def _jitter(named: dict[str, str], positional: list[str], spec: str) -> Op:
    keys = ("brightness", "contrast", "saturation", "hue")
    given = dict(zip(keys, positional, strict=False))
    if len(positional) == 1:  # one strength for brightness, contrast and saturation, as timm's
        given = dict.fromkeys(keys[:3], positional[0])
    given.update(named)
    ranges = [given.get(key, "0") for key in keys]
    strengths = [_numbers(value, spec, key)[0] for key, value in zip(keys, ranges, strict=True)]
    if any("-" in value for value in ranges) or strengths[3] > 0.5 or not any(strengths):
        raise SpecError(
            f"jitter in {spec!r} needs single strengths >= 0 (hue at most 0.5), at least one of "
            "them above 0, e.g. jitter:0.4 or jitter:brightness=0.4,hue=0.1"
        )
    return ColorJitter(*strengths)


def _gray(named: dict[str, str], positional: list[str], spec: str) -> Op:
    return Grayscale(p=_probability(named, positional, spec, "gray", "0.1"))


def _blur(named: dict[str, str], positional: list[str], spec: str) -> Op:
    kernel = _integer(
        named.get("kernel", positional[0] if positional else "5"),
        spec,
        "blur kernel",
        low=1,
        high=MAX_KERNEL,
    )
    if kernel % 2 == 0:
        raise SpecError(f"blur kernel {kernel} in {spec!r} must be odd, e.g. blur:5")
    sigma = _numbers(named.get("sigma", "0.1-2"), spec, "sigma")
    if sigma[0] <= 0:
        raise SpecError(f"blur sigma={named.get('sigma')} in {spec!r} must be > 0")
    return GaussianBlur(kernel=kernel, sigma=sigma, p=_probability(named, [], spec, "blur", "1"))


def _erase(named: dict[str, str], positional: list[str], spec: str) -> Op:
    scale = _numbers(named.get("scale", "0.02-0.33"), spec, "scale")
    ratio = _numbers(named.get("ratio", "0.3-3.3"), spec, "ratio")
    if not (scale[0] > 0 and scale[1] < 1 and ratio[0] > 0):
        raise SpecError(f"erase in {spec!r} needs 0 < scale < 1 and ratio > 0")
    value_text = named.get("value", "0")
    value = None if value_text == "random" else _numbers(value_text, spec, "value")[0]
    p = _probability(named, positional, spec, "erase", "0.5")
    return RandomErasing(p=p, scale=scale, ratio=ratio, value=value)


def _randaugment(named: dict[str, str], positional: list[str], spec: str) -> Op:
    given = {**dict(zip(("num_ops", "magnitude"), positional, strict=False)), **named}
    bins = _integer(given.get("bins", "31"), spec, "randaugment bins", low=2, high=MAX_BINS)
    num_ops = _integer(
        given.get("num_ops", "2"), spec, "randaugment num_ops", low=1, high=MAX_RAND_OPS
    )
    magnitude = _integer(
        given.get("magnitude", "9"), spec, "randaugment magnitude", low=0, high=bins - 1
    )
    return RandAugment(num_ops=num_ops, magnitude=magnitude, bins=bins)


def _trivialaugment(named: dict[str, str], positional: list[str], spec: str) -> Op:
    value = named.get("bins", positional[0] if positional else "31")
    return TrivialAugmentWide(
        bins=_integer(value, spec, "trivialaugment bins", low=2, high=MAX_BINS)
    )


def _autoaugment(named: dict[str, str], positional: list[str], spec: str) -> Op:
    return AutoAugment()


def _mix(kind: str) -> Callable[[dict[str, str], list[str], str], Mix]:
    def build(named: dict[str, str], positional: list[str], spec: str) -> Mix:
        alpha = _numbers(named.get("alpha", positional[0] if positional else "1"), spec, "alpha")
        if alpha[0] <= 0:
            raise SpecError(f"{kind} alpha {alpha[0]} in {spec!r} must be > 0")
        return Mix(kind=kind, alpha=alpha[0])

    return build


@dataclass(frozen=True)
class Operation:
    """One entry of :data:`OPERATIONS`: what it does in a few words, the arguments it takes (by
    name, and how many of them may be given positionally), an example, and how it is built from
    them and the recipe."""

    summary: str
    arguments: tuple[str, ...]
    max_positional: int
    example: str
    build: Callable[[dict[str, str], list[str], str], Op | Mix]


#: Every recipe operation, by name; the mixing ones (:class:`Mix`) may only come last. The CLI's
#: help reads the names from this source, without torch (kdcache.choices.RECIPE_OPERATIONS).
OPERATIONS: dict[str, Operation] = {
    "rrc": Operation(
        "random-resized crop", ("scale", "ratio", "size"), 0, "rrc:scale=0.35-1", _rrc
    ),
    "pad-crop": Operation(
        "zero-pad and crop back (CIFAR)", ("padding",), 1, "pad-crop:4", _pad_crop
    ),
    "flip": Operation("horizontal flip", ("p",), 1, "flip", _flip),
    "jitter": Operation(
        "colour jitter (brightness, contrast, saturation, hue)",
        ("brightness", "contrast", "saturation", "hue"),
        4,
        "jitter:0.4,0.4,0.4,0.1",
        _jitter,
    ),
    "gray": Operation("random grayscale", ("p",), 1, "gray:0.2", _gray),
    "blur": Operation(
        "Gaussian blur", ("kernel", "sigma", "p"), 1, "blur:5,sigma=0.1-2,p=0.5", _blur
    ),
    "randaugment": Operation(
        "RandAugment(N, M)", ("num_ops", "magnitude", "bins"), 2, "randaugment:2,9", _randaugment
    ),
    "trivialaugment": Operation(
        "TrivialAugmentWide", ("bins",), 1, "trivialaugment", _trivialaugment
    ),
    "autoaugment": Operation("AutoAugment, ImageNet policy", (), 0, "autoaugment", _autoaugment),
    "erase": Operation(
        "random erasing", ("p", "scale", "ratio", "value"), 1, "erase:0.25,value=random", _erase
    ),
    "mixup": Operation(
        "mixup with another sample (last)", ("alpha",), 1, "mixup:0.2", _mix("mixup")
    ),
    "cutmix": Operation(
        "CutMix with another sample (last)", ("alpha",), 1, "cutmix:1.0", _mix("cutmix")
    ),
}


def _parse_op(text: str, spec: str) -> Op | Mix:
    name, _, arg_text = text.strip().partition(":")
    operation = OPERATIONS.get(name)
    if operation is None:
        raise SpecError(
            f"unknown operation {name!r} in recipe {spec!r}; valid operations: "
            f"{', '.join(OPERATIONS)}; presets: {', '.join(PRESETS)} (e.g. 'rrc:scale=0.35-1+flip')"
        )
    args = [a.strip() for a in arg_text.split(",")] if arg_text else []
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(named) - set(operation.arguments))
    if unknown or len(positional) > operation.max_positional:
        raise SpecError(
            f"operation {text!r} in recipe {spec!r} takes "
            + (
                f"the arguments {', '.join(operation.arguments)}"
                if operation.arguments
                else "no arguments"
            )
            + (
                f" or {counted(operation.max_positional, 'value')}"
                if operation.max_positional
                else ""
            )
            + f", got {arg_text!r}; see docs/augmentation.md"
        )
    return operation.build(named, positional, spec)


def _expand_presets(parts: list[str], spec: str) -> list[str]:
    """``parts`` with each preset's name replaced by its operations."""
    expanded = []
    for part in parts:
        name, colon, _ = part.strip().partition(":")
        preset = PRESETS.get(name)
        if preset is None:
            expanded.append(part)
        elif colon:
            raise SpecError(
                f"preset {name!r} in recipe {spec!r} takes no arguments; write its operations "
                f"({preset.spec}) to change them"
            )
        else:
            expanded += preset.spec.split("+")
    return expanded


class Recipe:
    """A parsed recipe: operations on each image, then at most one mixing operation.

    With mixing, the partner goes through the same image operations with its own parameters
    (fields prefixed ``partner_``), so both images of a pair are independently augmented before
    they are mixed.
    """

    def __init__(self, spec: str) -> None:
        parts = spec.split("+")
        if not spec.strip() or any(not p.strip() for p in parts):
            raise SpecError(
                f"empty operation in recipe {spec!r}; expected OP[+OP...], e.g. 'pad-crop:4+flip'"
            )
        ops = [_parse_op(p, spec) for p in _expand_presets(parts, spec)]
        mixes = [i for i, op in enumerate(ops) if isinstance(op, Mix)]
        if mixes and (len(mixes) > 1 or mixes[0] != len(ops) - 1):
            raise SpecError(
                f"recipe {spec!r} may mix only once, as its last operation (e.g. "
                "'rrc+flip+mixup:0.2'): both images are augmented first, then mixed"
            )
        self.image_ops: tuple[Op, ...] = tuple(op for op in ops if isinstance(op, Op))
        self.mix: Mix | None = ops[-1] if isinstance(ops[-1], Mix) else None
        #: The view-parameter layout the recipe needs (see :data:`OPS_VERSION`).
        self.ops_version = max(op.since for op in self.image_ops) if self.image_ops else 1
        #: Canonical spec: every default written out, so equal recipes compare equal as text.
        self.spec = "+".join(op.describe() for op in ops)
        # A repeated operation's fields get a suffix: crop_top, crop_top_2, ...
        names = [f + (f"_{k + 1}" if k else "") for k, op in self._numbered() for f in op.fields]
        if self.mix is not None:
            names += list(self.mix.fields)
            names += [f"partner_{n}" for n in names[: self.mix_offset]]
        #: Names of the float32 parameters each view stores, in record order.
        self.fields: tuple[str, ...] = tuple(names)

    def _numbered(self) -> list[tuple[int, Op]]:
        seen: dict[str, int] = {}
        numbered = []
        for op in self.image_ops:
            count = seen.get(op.name, 0)
            seen[op.name] = count + 1
            numbered.append((count, op))
        return numbered

    @property
    def mix_offset(self) -> int:
        """Position of ``partner`` (then ``lam``) in a record: after the image operations'."""
        return sum(len(op.fields) for op in self.image_ops)

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    def out_size(self, size: Size) -> Size:
        for op in self.image_ops:
            size = op.out_size(size)
        return size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"Recipe({self.spec!r})"

    def _draw_image_ops(self, draws: Draws, size: Size) -> list[np.ndarray]:
        columns = []
        for op in self.image_ops:
            columns.append(op.draw(draws, size))
            draws = draws.at(op.num_draws)
            size = op.out_size(size)
        return columns

    def _records(
        self,
        *,
        seed: int,
        stream: int,
        index: np.ndarray,
        view: np.ndarray,
        num_samples: int,
        size: Size,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Float32 records ``(len(index), len(fields))`` of views ``(index[i], view[i])``, into
        ``out`` if given: the one implementation behind :meth:`sample` and :meth:`sample_table`."""
        draws = Draws.of(seed=seed, stream=stream, index=index, view=view)
        columns = self._draw_image_ops(draws, size)
        if self.mix is not None:
            image_draws = sum(op.num_draws for op in self.image_ops)
            draws = draws.at(image_draws)
            columns.append(self.mix.draw(draws, self.out_size(size), index, num_samples))
            columns += self._draw_image_ops(draws.at(self.mix.num_draws), size)
        if out is None:
            out = np.empty((len(index), len(self.fields)), dtype=np.float32)
        return np.concatenate(columns, axis=1, out=out)

    def sample(
        self, *, seed: int, index: int, view: int, num_samples: int, size: Size, stream: int = 0
    ) -> np.ndarray:
        """The float32 record of view ``view`` of sample ``index`` of ``num_samples``, for inputs of
        ``size`` (H, W): a pure function of its arguments, equal to that row of
        :meth:`sample_table`."""
        return self._records(
            seed=seed,
            stream=stream,
            index=np.array([index]),
            view=np.array([view]),
            num_samples=num_samples,
            size=size,
        )[0]

    def sample_table(
        self, *, seed: int, num_samples: int, views: int, size: Size, stream: int = 0
    ) -> np.ndarray:
        """Records of every view of every sample, shape ``(num_samples, views, len(fields))``,
        drawn :data:`CHUNK_ROWS` views at a time."""
        table = np.empty((num_samples, views, len(self.fields)), dtype=np.float32)
        per_chunk = max(1, CHUNK_ROWS // max(views, 1))
        for start in range(0, num_samples, per_chunk):
            stop = min(start + per_chunk, num_samples)
            index = np.repeat(np.arange(start, stop), views)
            view = np.tile(np.arange(views), stop - start)
            self._records(
                seed=seed,
                stream=stream,
                index=index,
                view=view,
                num_samples=num_samples,
                size=size,
                out=table[start:stop].reshape(len(index), len(self.fields)),
            )
        return table

    def sample_view(
        self, *, seed: int, view: int, num_samples: int, size: Size, stream: int = 0
    ) -> np.ndarray:
        """Records of view ``view`` of every sample, shape ``(num_samples, len(fields))``: what
        ``sample_table(...)[:, view]`` holds, without drawing the other views."""
        records = np.empty((num_samples, len(self.fields)), dtype=np.float32)
        for start in range(0, num_samples, CHUNK_ROWS):
            index = np.arange(start, min(start + CHUNK_ROWS, num_samples))
            self._records(
                seed=seed,
                stream=stream,
                index=index,
                view=np.full(len(index), view),
                num_samples=num_samples,
                size=size,
                out=records[start : start + len(index)],
            )
        return records

    def _apply_image_ops(
        self, image: torch.Tensor, values: np.ndarray, scale: PixelScale
    ) -> torch.Tensor:
        position = 0
        in_pixels = False  # colour operations run on pixels in [0, 1], the others on inputs
        for op in self.image_ops:
            if op.pixels != in_pixels:
                image = scale.to_pixels(image) if op.pixels else scale.to_inputs(image)
                in_pixels = op.pixels
            width = len(op.fields)
            image = op.apply(image, values[position : position + width])
            position += width
        return scale.to_inputs(image) if in_pixels else image

    def partner(self, values: np.ndarray) -> int | None:
        """The partner sample index a record mixes in, ``None`` for a recipe without mixing."""
        return None if self.mix is None else int(values[self.mix_offset])

    def lam(self, values: np.ndarray) -> float:
        """The share of the sample's own pixels in the view (1 without mixing)."""
        return 1.0 if self.mix is None else float(values[self.mix_offset + 1])

    def apply(
        self,
        image: torch.Tensor,
        values: np.ndarray,
        partner: torch.Tensor | None = None,
        *,
        scale: PixelScale | None = None,
    ) -> torch.Tensor:
        """The view a record describes, from the sample's clean input (and its partner's);
        ``scale`` says how the inputs map to pixels in [0, 1] for the colour operations
        (:meth:`PixelScale.of` the dataset; by default the inputs are pixels)."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(self.fields),):
            raise SpecError(
                f"recipe {self.spec!r} stores {len(self.fields)} parameters per view, got a "
                f"record of shape {values.shape}"
            )
        scale = scale or PixelScale()
        view = self._apply_image_ops(image, values, scale)
        if self.mix is None:
            return view
        if partner is None:
            raise SpecError(f"recipe {self.spec!r} mixes two samples: pass the partner's input")
        start = self.mix_offset
        mix_values = values[start : start + len(self.mix.fields)]
        other = self._apply_image_ops(partner, values[start + len(self.mix.fields) :], scale)
        return self.mix.mix(view, other, mix_values)


def parse_recipe(spec: str) -> Recipe:
    """The :class:`Recipe` a spec names; a malformed spec raises SpecError naming what was wrong."""
    return Recipe(spec)
