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
back to the input's size), ``flip[:P]`` (horizontal, probability P = 0.5), and as the last
operation at most one of ``mixup:ALPHA`` or ``cutmix:ALPHA`` (lambda ~ Beta(ALPHA, ALPHA)).

Every view of every sample has a fixed-width float32 parameter record (:attr:`Recipe.fields`)
drawn by :meth:`Recipe.sample` from a counter-based generator keyed by ``(seed, sample, view)``:
a pure function of those (and of N and the input size), so any process draws the same views.
:meth:`Recipe.apply` replays a record with ``torchvision.transforms.v2.functional``; the dump,
the cached run and the online run all go through it, so the same record gives the same pixels,
bit for bit on the CPU.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from kdcache.errors import SpecError

#: Stream tags in the generator key: stored views and student-only augmentation never share draws.
VIEW_STREAM, STUDENT_STREAM = 0, 1
_SIZE = tuple[int, int]


def _text(value: float) -> str:
    """Shortest text that reads back as exactly ``value`` (canonical specs must re-parse equal)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


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


class Op(ABC):
    """One operation: its parameter fields, how to draw them, and how to apply them."""

    name: str
    fields: tuple[str, ...] = ()

    @abstractmethod
    def sample(self, rng: np.random.Generator, size: _SIZE) -> list[float]:
        """Parameters for an input of ``size`` (H, W)."""

    @abstractmethod
    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor: ...

    def out_size(self, size: _SIZE) -> _SIZE:
        return size

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class RandomResizedCrop(Op):
    """A box of random area share and aspect ratio, resized (bilinear, antialiased) to ``size``."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    size: int | None = None
    name = "rrc"
    fields = ("crop_top", "crop_left", "crop_height", "crop_width")

    def sample(self, rng: np.random.Generator, size: _SIZE) -> list[float]:
        height, width = size
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        # torchvision's RandomResizedCrop.get_params, drawn from our generator.
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return [top, left, h, w]
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return [(height - h) // 2, (width - w) // 2, h, w]

    def out_size(self, size: _SIZE) -> _SIZE:
        return size if self.size is None else (self.size, self.size)

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        top, left, h, w = (int(v) for v in values)
        out = list(self.out_size((image.shape[-2], image.shape[-1])))
        return TF.resized_crop(image, top, left, h, w, out, antialias=True)

    def describe(self) -> str:
        size = "" if self.size is None else f",size={self.size}"
        scale, ratio = (f"{_text(a)}-{_text(b)}" for a, b in (self.scale, self.ratio))
        return f"rrc:scale={scale},ratio={ratio}{size}"


@dataclass(frozen=True)
class PadCrop(Op):
    """Zero-pad ``padding`` pixels on every side, then crop the input's size at a random offset."""

    padding: int = 4
    name = "pad-crop"
    fields = ("pad_top", "pad_left")

    def sample(self, rng: np.random.Generator, size: _SIZE) -> list[float]:
        span = 2 * self.padding + 1
        return [int(rng.integers(0, span)), int(rng.integers(0, span))]

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        top, left = (int(v) for v in values)
        height, width = image.shape[-2], image.shape[-1]
        padded = TF.pad(image, [self.padding], fill=0.0)
        return TF.crop(padded, top, left, height, width)

    def describe(self) -> str:
        return f"pad-crop:{self.padding}"


@dataclass(frozen=True)
class Flip(Op):
    """Mirror left-right with probability ``p``."""

    p: float = 0.5
    name = "flip"
    fields = ("flip",)

    def sample(self, rng: np.random.Generator, size: _SIZE) -> list[float]:
        return [float(rng.random() < self.p)]

    def apply(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        return TF.horizontal_flip(image) if values[0] else image

    def describe(self) -> str:
        return "flip" if self.p == 0.5 else f"flip:{_text(self.p)}"


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

    def sample(self, rng: np.random.Generator, size: _SIZE, index: int, n: int) -> list[float]:
        partner = int(rng.integers(0, max(n - 1, 1)))
        partner = partner + (partner >= index) if n > 1 else index
        lam = float(rng.beta(self.alpha, self.alpha))
        if self.kind == "mixup":
            return [partner, float(np.float32(lam))]
        height, width = size
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        box_h, box_w = bottom - top, right - left
        lam = 1.0 - box_h * box_w / (height * width)
        return [partner, float(np.float32(lam)), top, left, box_h, box_w]

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

    def describe(self) -> str:
        return f"{self.kind}:{_text(self.alpha)}"


def _parse_op(text: str, spec: str) -> Op | Mix:
    name, _, arg_text = text.strip().partition(":")
    args = [a.strip() for a in arg_text.split(",")] if arg_text else []
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)

    def only(allowed: tuple[str, ...], max_positional: int) -> None:
        unknown = sorted(set(named) - set(allowed))
        if unknown or len(positional) > max_positional:
            raise SpecError(
                f"operation {text!r} in recipe {spec!r} takes "
                + (f"the arguments {', '.join(allowed)}" if allowed else "")
                + (f" or {max_positional} value(s)" if max_positional else "")
                + f", got {arg_text!r}; see docs/augmentation.md"
            )

    if name == "rrc":
        only(("scale", "ratio", "size"), 0)
        scale = _numbers(named.get("scale", "0.08-1"), spec, "scale")
        ratio = _numbers(named.get("ratio", "0.75-1.3333333"), spec, "ratio")
        if not (0 < scale[0] and scale[1] <= 1 and ratio[0] > 0):
            raise SpecError(f"rrc in {spec!r} needs 0 < scale <= 1 and ratio > 0")
        size = named.get("size")
        if size is not None and not (size.isdigit() and int(size) >= 1):
            raise SpecError(f"rrc size={size!r} in {spec!r} must be an integer >= 1")
        return RandomResizedCrop(scale=scale, ratio=ratio, size=None if size is None else int(size))
    if name == "pad-crop":
        only(("padding",), 1)
        value = named.get("padding", positional[0] if positional else "4")
        if not (value.isdigit() and int(value) >= 1):
            raise SpecError(f"pad-crop:{value} in {spec!r}: padding must be an integer >= 1")
        return PadCrop(padding=int(value))
    if name == "flip":
        only(("p",), 1)
        p = _numbers(named.get("p", positional[0] if positional else "0.5"), spec, "p")[0]
        if not 0 <= p <= 1:
            raise SpecError(f"flip probability {p} in {spec!r} must lie in [0, 1]")
        return Flip(p=p)
    if name in ("mixup", "cutmix"):
        only(("alpha",), 1)
        alpha = _numbers(named.get("alpha", positional[0] if positional else "1"), spec, "alpha")[0]
        if alpha <= 0:
            raise SpecError(f"{name} alpha {alpha} in {spec!r} must be > 0")
        return Mix(kind=name, alpha=alpha)
    raise SpecError(
        f"unknown operation {name!r} in recipe {spec!r}; valid operations: rrc, pad-crop, flip, "
        "mixup, cutmix (e.g. 'rrc:scale=0.35-1+flip')"
    )


class Recipe:
    """A parsed recipe: geometric operations, then at most one mixing operation.

    With mixing, the partner goes through the same geometric operations with its own
    parameters (fields prefixed ``partner_``), so both images of a pair are independently
    augmented before they are mixed.
    """

    def __init__(self, spec: str) -> None:
        parts = spec.split("+")
        if not spec.strip() or any(not p.strip() for p in parts):
            raise SpecError(
                f"empty operation in recipe {spec!r}; expected OP[+OP...], e.g. 'pad-crop:4+flip'"
            )
        ops = [_parse_op(p, spec) for p in parts]
        mixes = [i for i, op in enumerate(ops) if isinstance(op, Mix)]
        if mixes and (len(mixes) > 1 or mixes[0] != len(ops) - 1):
            raise SpecError(
                f"recipe {spec!r} may mix only once, as its last operation (e.g. "
                "'rrc+flip+mixup:0.2'): both images are augmented first, then mixed"
            )
        self.geometric: tuple[Op, ...] = tuple(op for op in ops if isinstance(op, Op))
        self.mix: Mix | None = ops[-1] if isinstance(ops[-1], Mix) else None
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
        for op in self.geometric:
            count = seen.get(op.name, 0)
            seen[op.name] = count + 1
            numbered.append((count, op))
        return numbered

    @property
    def mix_offset(self) -> int:
        """Position of ``partner`` (then ``lam``) in a record: after the geometric fields."""
        return sum(len(op.fields) for op in self.geometric)

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    def out_size(self, size: _SIZE) -> _SIZE:
        for op in self.geometric:
            size = op.out_size(size)
        return size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"Recipe({self.spec!r})"

    def _sample_geometric(self, rng: np.random.Generator, size: _SIZE) -> list[float]:
        values: list[float] = []
        for op in self.geometric:
            values += op.sample(rng, size)
            size = op.out_size(size)
        return values

    def sample(
        self, *, seed: int, index: int, view: int, num_samples: int, size: _SIZE, stream: int = 0
    ) -> np.ndarray:
        """The float32 record of view ``view`` of sample ``index`` of ``num_samples``, for inputs of
        ``size`` (H, W): a pure function of its arguments."""
        rng = np.random.default_rng([seed, index, view, stream])
        values = self._sample_geometric(rng, size)
        if self.mix is not None:
            values += self.mix.sample(rng, self.out_size(size), index, num_samples)
            values += self._sample_geometric(rng, size)
        return np.asarray(values, dtype=np.float32)

    def sample_table(
        self, *, seed: int, num_samples: int, views: int, size: _SIZE, stream: int = 0
    ) -> np.ndarray:
        """Records of every view of every sample, shape ``(num_samples, views, len(fields))``."""
        table = np.empty((num_samples, views, len(self.fields)), dtype=np.float32)
        for index in range(num_samples):
            for view in range(views):
                table[index, view] = self.sample(
                    seed=seed,
                    index=index,
                    view=view,
                    num_samples=num_samples,
                    size=size,
                    stream=stream,
                )
        return table

    def _apply_geometric(self, image: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        position = 0
        for op in self.geometric:
            width = len(op.fields)
            image = op.apply(image, values[position : position + width])
            position += width
        return image

    def partner(self, values: np.ndarray) -> int | None:
        """The partner sample index a record mixes in, ``None`` for a recipe without mixing."""
        return None if self.mix is None else int(values[self.mix_offset])

    def lam(self, values: np.ndarray) -> float:
        """The share of the sample's own pixels in the view (1 without mixing)."""
        return 1.0 if self.mix is None else float(values[self.mix_offset + 1])

    def apply(
        self, image: torch.Tensor, values: np.ndarray, partner: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The view a record describes, from the sample's clean input (and its partner's)."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(self.fields),):
            raise SpecError(
                f"recipe {self.spec!r} stores {len(self.fields)} parameters per view, got a "
                f"record of shape {values.shape}"
            )
        view = self._apply_geometric(image, values)
        if self.mix is None:
            return view
        if partner is None:
            raise SpecError(f"recipe {self.spec!r} mixes two samples: pass the partner's input")
        start = self.mix_offset
        mix_values = values[start : start + len(self.mix.fields)]
        other = self._apply_geometric(partner, values[start + len(self.mix.fields) :])
        return self.mix.mix(view, other, mix_values)


def parse_recipe(spec: str) -> Recipe:
    """The :class:`Recipe` a spec names; a malformed spec raises SpecError naming what was wrong."""
    return Recipe(spec)
