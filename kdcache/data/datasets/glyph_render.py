"""The glyphs of ``glyphs:CLASSES``: which characters are classes, and each sample's pixels.

The faces are the TrueType fonts matplotlib installs: DejaVu Sans, Serif and Sans Mono in
regular, bold, italic and bold italic (12 faces), STIX General in the same four styles and five
Computer Modern faces (roman, bold, italic, sans, typewriter). A character is a candidate class
when all 12 DejaVu faces draw it (its Unicode category a letter, number, punctuation or symbol);
STIX faces join where their character map has it, and the Computer Modern ones only for ASCII
letters and digits (their TeX encoding puts other glyphs at the other ASCII codes).

Candidates come in a fixed order (ASCII digits, capitals and small letters, then every other one
by code point) and are kept greedily: one is dropped when fewer than a quarter of the faces that
draw both it and some kept class tell the two apart (:data:`LOOK_ALIKE`,
:data:`TOLD_APART_SHARE`), or when a face draws nothing visible for it. The first CLASSES kept
characters are the classes, so ``glyphs:10`` is the digits and every ``glyphs:N`` is a prefix of
``glyphs:M`` for N < M.

A sample is one class's glyph in a drawn face, size, position, rotation and stroke weight. Each
glyph is drawn once per face by FreeType at an em of twice SIZE (and made thinner or bolder by an
erosion or dilation); a sample is that drawing mapped by its affine transform onto a grid of
twice SIZE (bilinear) and averaged 2 x 2 down to SIZE x SIZE, white ink on black. Each sample's
draws come from a generator seeded by the split and the character alone, so a sample is the same
whatever CLASSES and PER_CLASS are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

#: Bumped whenever a change below alters any rendered pixel or the class order (cache keys hold it).
RENDER_VERSION = 1

_DEJAVU = tuple(
    f"{family}{style}"
    for family, styles in (
        ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
        ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
    )
    for style in styles
)
_STIX = ("STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta")
_COMPUTER_MODERN = ("cmr10", "cmb10", "cmti10", "cmss10", "cmtt10")
#: Every face a sample may be drawn in, by file name (without ``.ttf``) under matplotlib's fonts.
FACES = _DEJAVU + _STIX + _COMPUTER_MODERN
_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

#: A face tells two characters apart when, drawn as samples are (em 0.675 x 32 px, upright, ink
#: centred horizontally, baseline fixed), their pixels differ by at least this root-mean-square
#: fraction of the larger one's ink.
LOOK_ALIKE = 0.1
#: Two characters are two classes when at least this share of the faces drawing both tell them
#: apart; otherwise the later one is dropped.
TOLD_APART_SHARE = 0.25

#: Each sample's em is this fraction of SIZE, drawn uniformly.
SCALE_RANGE = (0.55, 0.8)
#: Largest rotation, in degrees either way.
MAX_ROTATION = 15.0
#: Largest move of the glyph, as a fraction of SIZE each way.
MAX_SHIFT = 0.1
#: How much thinner or bolder a sample's strokes may be, each side, as a fraction of the em.
STROKE_CHANGE = 1 / 64
#: Where the anchor of a glyph lies above its baseline, as a fraction of the em: about the
#: middle of a capital, so most glyphs of most faces fit at the largest scale.
_ANCHOR_HEIGHT = 0.35
_REFERENCE_SIZE = 32
#: The uniform draws of one sample: face, scale, rotation, x shift, y shift, stroke.
_DRAWS = 6
#: The draws of a plain sample: mid scale, upright, centred, strokes as drawn (face chosen apart).
_PLAIN = np.array([0.0, 0.5, 0.5, 0.5, 0.5, 0.5])


def fonts_folder() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def font_digests() -> dict[str, str]:
    """The sha256 of every face's file, so that a cache follows the fonts it was drawn from."""
    return {
        face: hashlib.sha256((fonts_folder() / f"{face}.ttf").read_bytes()).hexdigest()
        for face in FACES
    }


@functools.cache
def _character_maps() -> dict[str, frozenset[int]]:
    from matplotlib.ft2font import FT2Font

    return {
        face: frozenset(FT2Font(str(fonts_folder() / f"{face}.ttf")).get_charmap())
        for face in FACES
    }


def _candidates() -> list[str]:
    """Every candidate class, in the order classes are chosen."""
    maps = _character_maps()
    drawn = frozenset.intersection(*(maps[face] for face in _DEJAVU))
    others = sorted(
        code
        for code in drawn
        if unicodedata.category(chr(code))[0] in "LNPS" and chr(code) not in _ALPHANUMERIC
    )
    return list(_ALPHANUMERIC) + [chr(code) for code in others]


def faces_of(character: str) -> tuple[str, ...]:
    """The faces a sample of ``character`` may be drawn in, in :data:`FACES` order."""
    maps = _character_maps()
    return tuple(
        face
        for face in FACES
        if ord(character) in maps[face]
        and (face not in _COMPUTER_MODERN or character in _ALPHANUMERIC)
    )


@functools.cache
def _font(face: str, em: int) -> ImageFont.FreeTypeFont:
    # The basic layout: one glyph needs no shaping, and it does not depend on libraqm's presence.
    return ImageFont.truetype(
        str(fonts_folder() / f"{face}.ttf"), size=em, layout_engine=ImageFont.Layout.BASIC
    )


def _drawing(character: str, face: str, em: int) -> tuple[np.ndarray, float, float]:
    """``character`` drawn by FreeType at ``em`` pixels: its ink in [0, 1] and the anchor every
    sample is placed by (ink centred horizontally, :data:`_ANCHOR_HEIGHT` over the baseline),
    with a margin that leaves room for a bolder stroke."""
    font = _font(face, em)
    left, top, right, bottom = (int(edge) for edge in font.getbbox(character, anchor="ls"))
    margin = _stroke_radius(em) + 1
    ink = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin))
    ImageDraw.Draw(ink).text(
        (margin - left, margin - top), character, font=font, fill=255, anchor="ls"
    )
    anchor_x = (right - left) / 2 + margin
    anchor_y = -_ANCHOR_HEIGHT * em - top + margin
    return np.asarray(ink, dtype=np.float32) / 255.0, anchor_x, anchor_y


def _stroke_radius(em: int) -> int:
    return max(1, round(em * STROKE_CHANGE))


def _render(
    drawings: list[tuple[np.ndarray, float, float]],
    which: np.ndarray,
    draws: np.ndarray,
    *,
    size: int,
) -> np.ndarray:
    """Samples ``(len(draws), size, size)`` uint8: sample i is ``drawings[which[i]]`` (drawn at
    em ``2 * size``) placed by its draws ``draws[i]``. A sample's pixels depend on its drawing
    and draws alone, not on the other samples of the call."""
    radius = _stroke_radius(2 * size)
    pair_of_sample = which * 3 + (draws[:, 5] * 3).astype(np.int64)
    grid = _sampling_grid(draws, [drawings[k] for k in which], size=size)
    doubled = torch.empty(len(draws), 1, 2 * size, 2 * size)
    order = np.argsort(pair_of_sample, kind="stable")
    pairs, starts = np.unique(pair_of_sample[order], return_index=True)
    for pair, samples in zip(pairs, np.split(order, starts[1:]), strict=True):
        chosen = torch.from_numpy(samples)
        source = _stroked(drawings[pair // 3][0], pair % 3, radius)
        doubled[chosen] = torch.nn.functional.grid_sample(
            source.expand(len(samples), -1, -1, -1),
            grid[chosen],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
    pixels = torch.nn.functional.avg_pool2d(doubled, 2)[:, 0]
    return pixels.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _stroked(ink: np.ndarray, weight: int, radius: int) -> torch.Tensor:
    """The ink eroded (weight 0), as drawn (1) or dilated (2) by a square of side 2r+1."""
    pixels = torch.from_numpy(ink)[None, None]
    if weight == 1:
        return pixels
    sign = 1.0 if weight == 2 else -1.0
    return sign * torch.nn.functional.max_pool2d(sign * pixels, 2 * radius + 1, 1, radius)


def _sampling_grid(
    draws: np.ndarray, drawings: list[tuple[np.ndarray, float, float]], *, size: int
) -> torch.Tensor:
    """Where each pixel of each sample's doubled grid reads its drawing, ``(n, 2 size, 2 size,
    2)`` in grid_sample's coordinates (-1 and 1 the drawing's outer edges, align_corners False;
    zeros beyond, and the drawing's margin keeps a bolder stroke inside): the pixel's offset
    from the sample's centre, rotated by minus its angle, divided by its scale, from the anchor.

    Per sample, ``x' = a x + b y + c`` and ``y' = d x + e y + f`` with coefficients from ``math``
    (double precision); the rest is elementwise, each operation rounded once, so every machine
    computes the same grid and a sample's does not depend on the others in the call."""
    em = 2 * size
    coefficients = []
    for d, (ink, anchor_x, anchor_y) in zip(draws, drawings, strict=True):
        scale = (SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * d[1]) * size / em
        angle = math.radians(MAX_ROTATION * (2 * d[2] - 1))
        centre_x = size / 2 + MAX_SHIFT * size * (2 * d[3] - 1)
        centre_y = size / 2 + MAX_SHIFT * size * (2 * d[4] - 1)
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        half_width, half_height = ink.shape[1] / 2, ink.shape[0] / 2
        coefficients.append(
            (
                cos / half_width,
                sin / half_width,
                (anchor_x - cos * centre_x - sin * centre_y) / half_width - 1,
                -sin / half_height,
                cos / half_height,
                (anchor_y + sin * centre_x - cos * centre_y) / half_height - 1,
            )
        )
    a, b, c, d_, e, f = torch.tensor(coefficients, dtype=torch.float64).T[..., None, None]
    # Output pixel centres on the doubled grid, in output pixels.
    steps = (torch.arange(2 * size, dtype=torch.float64) + 0.5) / 2
    across, down = steps[None, None, :], steps[None, :, None]
    grid = torch.empty(len(draws), 2 * size, 2 * size, 2)
    torch.add((a * across).float(), (b * down + c).float(), out=grid[..., 0])
    torch.add((d_ * across).float(), (e * down + f).float(), out=grid[..., 1])
    return grid


def sample_draws(split: str, character: str, count: int) -> np.ndarray:
    """The uniform draws of the first ``count`` samples of ``character`` in ``split``: a
    ``(count, 6)`` array whose row i depends on nothing but the split, character and i."""
    stream = np.random.default_rng([RENDER_VERSION, {"train": 0, "test": 1}[split], ord(character)])
    return stream.random((count, _DRAWS))


def render_samples(character: str, draws: np.ndarray, *, size: int) -> np.ndarray:
    """The samples of ``character`` with the given draws, ``(len(draws), size, size)`` uint8."""
    faces = faces_of(character)
    chosen = (draws[:, 0] * len(faces)).astype(np.int64)
    used, which = np.unique(chosen, return_inverse=True)
    drawings = [_drawing(character, faces[k], 2 * size) for k in used]
    return _render(drawings, which.reshape(-1), draws, size=size)


def _references(characters: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``characters`` drawn in each face the plain way (:data:`_PLAIN`): per face, the positions
    in ``characters`` of those it draws and their ``(n, 32 * 32)`` pixels in [0, 1]."""
    pairs = [(p, c, face) for p, c in enumerate(characters) for face in faces_of(c)]
    pixels = np.concatenate(
        [
            _render(
                [_drawing(c, face, 2 * _REFERENCE_SIZE) for _, c, face in chunk],
                np.arange(len(chunk)),
                np.repeat(_PLAIN[None, :], len(chunk), axis=0),
                size=_REFERENCE_SIZE,
            )
            for chunk in (pairs[i : i + 1024] for i in range(0, len(pairs), 1024))
        ]
    )
    flat = pixels.reshape(len(pairs), -1).astype(np.float32) / 255.0
    faces = np.array([face for _, _, face in pairs])
    positions = np.array([p for p, _, _ in pairs], dtype=np.int64)
    return {
        face: (positions[faces == face], flat[faces == face])
        for face in FACES
        if (faces == face).any()
    }


def _told_apart(
    left: tuple[np.ndarray, np.ndarray],
    right: tuple[np.ndarray, np.ndarray],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Over one face, which pairs (left, right) it draws both of and which of those it tells
    apart (:data:`LOOK_ALIKE`), as two boolean ``shape`` arrays indexed by position."""
    (left_at, a), (right_at, b) = left, right
    a_energy, b_energy = (a**2).sum(axis=1), (b**2).sum(axis=1)
    squared = a_energy[:, None] + b_energy[None, :] - 2 * (a @ b.T)
    energy = np.maximum(a_energy[:, None], b_energy[None, :])
    shared = np.zeros(shape, dtype=bool)
    apart = np.zeros(shape, dtype=bool)
    shared[np.ix_(left_at, right_at)] = True
    apart[np.ix_(left_at, right_at)] = squared >= LOOK_ALIKE**2 * energy
    return shared, apart


class _Selection:
    """The classes chosen so far from the candidates, extended on demand."""

    #: The most candidates drawn and compared at once (one matrix product per face).
    BLOCK = 128

    def __init__(self) -> None:
        self.candidates = _candidates()
        self.next_candidate = 0
        self.classes: list[str] = []
        # Per face: the positions in self.classes of the kept classes it draws, and their pixels.
        self.kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def extend_to(self, count: int) -> None:
        while len(self.classes) < count and self.next_candidate < len(self.candidates):
            wanted = min(self.BLOCK, max(count - len(self.classes), 16))
            block = self.candidates[self.next_candidate : self.next_candidate + wanted]
            self.next_candidate += len(block)
            self._add(block, count)

    def _add(self, block: list[str], count: int) -> None:
        references = _references(block)
        n, k = len(block), len(self.classes)
        # A candidate is dropped when some class, kept before or earlier in this block, shares
        # faces with it and too few of those tell the two apart.
        shared_kept, apart_kept = np.zeros((k, n), np.int64), np.zeros((k, n), np.int64)
        shared_block, apart_block = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
        visible = np.ones(n, dtype=bool)
        for face, (at, pixels) in references.items():
            visible[at[~pixels.any(axis=1)]] = False
            if face in self.kept:
                shared, apart = _told_apart(self.kept[face], (at, pixels), (k, n))
                shared_kept += shared
                apart_kept += apart
            shared, apart = _told_apart((at, pixels), (at, pixels), (n, n))
            shared_block += shared
            apart_block += apart
        alike_kept = (shared_kept > 0) & (apart_kept < TOLD_APART_SHARE * shared_kept)
        alike_block = (shared_block > 0) & (apart_block < TOLD_APART_SHARE * shared_block)
        chosen: list[int] = []
        for j in range(n):
            if len(self.classes) + len(chosen) == count:
                break
            # A face that draws nothing visible for it (a space-like symbol) disqualifies it.
            if visible[j] and not alike_kept[:, j].any() and not alike_block[chosen, j].any():
                chosen.append(j)
        # Candidates past the last one examined are examined again by the next extension.
        examined = chosen[-1] + 1 if len(self.classes) + len(chosen) == count else n
        self.next_candidate -= n - examined
        offset = len(self.classes)
        self.classes += [block[j] for j in chosen]
        new_position = {j: offset + i for i, j in enumerate(chosen)}
        for face, (at, pixels) in references.items():
            keep = np.array([j in new_position for j in at], dtype=bool)
            if not keep.any():
                continue
            positions = np.array([new_position[j] for j in at[keep]], dtype=np.int64)
            old_at, old_pixels = self.kept.get(face, (np.empty(0, np.int64), pixels[:0]))
            self.kept[face] = (
                np.concatenate([old_at, positions]),
                np.concatenate([old_pixels, pixels[keep]]),
            )


@functools.cache
def _selection() -> _Selection:
    return _Selection()


def glyph_classes(count: int) -> tuple[str, ...]:
    """The first ``count`` classes (fewer when the fonts hold fewer distinct glyphs)."""
    selection = _selection()
    with one_torch_thread():
        selection.extend_to(count)
    return tuple(selection.classes[:count])


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread within: drawing's tensors are small, and splitting each operation
    across threads costs more than it gains (on 2 busy cores, ten times more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
