"""Teacher distributions kept as a few draws: the unbiased "sparse logit sampling" of a row.

Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025)
show that caching the top-k of a teacher's softmax biases the student (the tail's mass is lost, or
spread where it does not belong), and that S draws from the teacher's distribution p, kept as
classes and counts, give an unbiased target: with p_hat_c = count_c / S,

    E[p_hat] = p,   so   E[-sum_c p_hat_c log q_c] = -sum_c p_c log q_c

and the cross-entropy to p_hat (forward KL up to a constant) has the full distribution's expected
gradient. Their results are at about a dozen draws per token. The draws are taken at T = 1, so the
target is p_1: distilling at another temperature would need p_T / p_1 per class, which the draws do
not keep.

Unbiased is not enough on a flat teacher: the draws' noise, sum_c p_c (1 - p_c) / S per row, is
what moves the gradient away from the dense one (docs/results.md, "Sampled: bias or variance").
``systematic`` draws (one uniform u per row, the S points (u + i) / S on the row's CDF) keep
E[count_c / S] = p_c with each class drawn floor(S p_c) or ceil(S p_c) times, so a class with
p_c >= 1 / S is never missed and its share is off by less than 1 / S: the same store, the same
loss, less noise.

Two ways to take the draws, with the same distribution and arrays: :func:`draw_samples` on the
host, from a generator seeded by the block's bytes, and :func:`draw_rows` where the teacher ran (a
GPU dump), at uniforms hashed from each row's index in the store.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import ConfigError

#: The temperature the draws are taken at, the only one they are an unbiased target for.
DRAWN_AT = 1.0


def check_draws_temperature(temperature: float, *, option: str = "--temperature") -> None:
    """Refuse, in one line, distilling draws at a temperature other than :data:`DRAWN_AT`
    (softening the draws' shares would sharpen or flatten p_hat, not give p_T)."""
    if temperature != DRAWN_AT:
        raise ConfigError(
            f"a sampled:S store holds draws from the teacher at T = 1, got temperature "
            f"{temperature:g}; distill it at {option} 1, or dump with topk:K for other T"
        )


@dataclass(frozen=True)
class SampledLogits:
    """Rows of teacher draws: ``indices`` (B, S) int64 classes, ``probs`` (B, S) the share
    ``count / S`` of each (zero in the padding slots of rows with fewer than S distinct classes).
    ``probs`` sums to 1 per row; every other class has p_hat = 0."""

    indices: Tensor
    probs: Tensor
    num_classes: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indices.shape[0], self.num_classes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SampledLogits:
        return SampledLogits(
            indices=self.indices.to(device, non_blocking=True),
            probs=self.probs.to(device=device, dtype=dtype or self.probs.dtype, non_blocking=True),
            num_classes=self.num_classes,
        )

    def dense_probs(self) -> Tensor:
        """p_hat as a dense (B, C) tensor; for tests and small inspections only."""
        out = torch.zeros(self.indices.shape[0], self.num_classes, dtype=self.probs.dtype)
        return out.scatter_add_(1, self.indices, self.probs)


#: Rows drawn at a time: a block's float64 probabilities and counts stay in the core's cache.
DRAW_BLOCK_ELEMENTS = 1 << 16


#: How the S draws of a row are taken: independently (multinomial, with replacement) or as S evenly
#: spaced points on the row's CDF from one uniform (systematic).
DRAW_SCHEMES = ("multinomial", "systematic")


#: The largest float64 below 1: where a point (u + i) / S that rounded up to 1 is put back.
_BELOW_ONE = 1.0 - 2.0**-53


def _cdf(probs: Tensor) -> Tensor:
    """Each row's CDF, ending at exactly 1 (a sum divided by itself), so that every point in
    [0, 1) falls on a class, and never on one of probability 0."""
    cdf = probs.cumsum(dim=1)
    return cdf.div_(cdf[:, -1:].clone())


def _systematic(probs: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """(B, S) classes: the points (u + i) / S, u ~ U[0, 1) per row, looked up on the CDF."""
    start = torch.rand(len(probs), 1, generator=generator, dtype=probs.dtype)
    points = (start + torch.arange(num_draws, dtype=probs.dtype)) / num_draws
    return torch.searchsorted(_cdf(probs), points.clamp_max_(_BELOW_ONE), right=True)


def draw_samples(
    logits: np.ndarray, num_draws: int, *, scheme: str = "multinomial"
) -> tuple[np.ndarray, np.ndarray]:
    """``num_draws`` classes per row drawn from softmax(``logits``) (B, C) by ``scheme`` (one of
    :data:`DRAW_SCHEMES`; multinomial draws with replacement).

    Returns the distinct classes (B, S) in ascending order and their counts (B, S) uint8; a row
    with fewer than S distinct classes is padded with its last class and count 0. Ascending ids
    are what the store codes cheaply (``kdcache.packed_ints`` writes the gaps between them: 2.5
    fewer bytes a token than the most-drawn-first order at S = 12, V = 32k). The generator is
    seeded from the block's bytes, so a resumed dump that recomputes a batch draws the same
    classes. The rows are drawn a few at a time from the one generator: torch draws row after
    row, so the draws are those of the whole block at once.
    """
    block = np.ascontiguousarray(logits, dtype=np.float32)
    generator = torch.Generator().manual_seed(zlib.crc32(block.data))
    classes = np.empty((len(block), num_draws), dtype=np.int64)
    counts = np.empty((len(block), num_draws), dtype=np.uint8)
    step = max(1, DRAW_BLOCK_ELEMENTS // max(1, block.shape[1]))
    for start in range(0, len(block), step):
        rows = slice(start, start + step)
        probs = torch.softmax(torch.from_numpy(block[rows]).double(), dim=1)
        if scheme == "systematic":
            draws = _systematic(probs, num_draws, generator)
        else:
            draws = torch.multinomial(probs, num_draws, replacement=True, generator=generator)
        distinct, drawn_counts = _distinct(draws.sort(dim=1).values)
        classes[rows], counts[rows] = distinct.numpy(), drawn_counts.numpy()
    return classes, counts


#: Rows drawn at a time on the teacher's device: a block's float64 CDF takes 2^24 x 8 bytes.
DEVICE_DRAW_BLOCK_ELEMENTS = 1 << 24
_MASK32 = 0xFFFFFFFF


def _mix32(values: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") of int64 ``values`` in [0, 2^32), elementwise.
    Integer arithmetic only, so every device computes the same bits; the products wrap past 2^63
    as two's complement, which keeps their low 32 bits exact."""
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & _MASK32
    values = values ^ (values >> 15)
    values = (values * 0x846CA68B) & _MASK32
    return values ^ (values >> 16)


def row_uniforms(rows: Tensor, count: int) -> Tensor:
    """(B, count) float64 uniforms in [0, 1) fixed by each row's store index ``rows`` (B,) int64:
    draw i of row r is a hash of (r, i), 53 bits each, so a row draws the same whatever batch,
    rank or resumed dump computes it, and no generator state crosses the device."""
    rows = rows.to(torch.int64)[:, None]
    slot = torch.arange(count, device=rows.device, dtype=torch.int64)[None, :]
    high_word, low_word = rows >> 32, rows & _MASK32
    # Two independent 32-bit hashes of the row: rows sharing both are as rare as 64-bit ones.
    # (The constants keep row 0 off the hash's fixed point 0.)
    first = _mix32(_mix32(high_word ^ 0x68E31DA4) ^ low_word)
    second = _mix32(_mix32(high_word ^ 0x5BD1E995) ^ low_word ^ 0x1B873593)
    high = _mix32((first + slot * 0x9E3779B9) & _MASK32)
    low = _mix32((second + slot * 0x85EBCA77) & _MASK32)
    bits53 = (high << 21) | (low >> 11)
    return bits53.to(torch.float64) * 2.0**-53


def draw_rows(
    logits: Tensor, rows: Tensor, num_draws: int, *, scheme: str = DRAW_SCHEMES[0]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`draw_samples` with torch where ``logits`` (B, C) are, for the store rows ``rows``
    (B,): the same distribution and the same arrays (distinct classes ascending, padded with the
    last class at count 0; counts uint8), drawn by inverting each row's CDF at uniforms fixed by
    the row's index (:func:`row_uniforms`) instead of from a generator seeded by the block's bytes,
    which would need the bytes on the host. Another device draws other classes from the same
    logits only where its float64 CDF differs in the last bit right at a uniform.

    Also returns ``finite`` (B,) bool: a row holding NaN or Inf is drawn from its finite values
    (the others taken as 0) and must be refused by the caller.
    """
    rows = rows.to(logits.device, non_blocking=True)
    classes = torch.empty(len(logits), num_draws, dtype=torch.int64, device=logits.device)
    counts = torch.empty(len(logits), num_draws, dtype=torch.uint8, device=logits.device)
    finite = torch.empty(len(logits), dtype=torch.bool, device=logits.device)
    step = max(1, DEVICE_DRAW_BLOCK_ELEMENTS // max(1, logits.shape[1]))
    for start in range(0, len(logits), step):
        block = slice(start, start + step)
        values = logits[block].double()
        finite[block] = torch.isfinite(values).all(dim=1)
        cdf = _cdf(torch.softmax(values.nan_to_num_(0.0, 0.0, 0.0), dim=1))
        if scheme == "systematic":
            first = row_uniforms(rows[block], 1)
            points = (first + torch.arange(num_draws, device=cdf.device)) / num_draws
            points.clamp_max_(_BELOW_ONE)
        else:
            points = row_uniforms(rows[block], num_draws).sort(dim=1).values
        classes[block], counts[block] = _distinct(torch.searchsorted(cdf, points, right=True))
    return classes, counts, finite


def _distinct(drawn: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending draws (B, S) as their distinct classes and counts, left-aligned, padded with the
    last class at count 0."""
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = starts.cumsum(dim=1) - 1
    counts = torch.zeros_like(drawn).scatter_add_(1, group, torch.ones_like(drawn))
    distinct = torch.zeros_like(drawn).scatter_(1, group, drawn)
    groups = group[:, -1:] + 1
    padding = torch.arange(drawn.shape[1], device=drawn.device)[None, :] >= groups
    distinct = torch.where(padding, distinct.gather(1, groups - 1), distinct)
    return distinct, counts.to(torch.uint8)
