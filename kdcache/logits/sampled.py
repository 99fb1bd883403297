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


def _systematic(probs: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """(B, S) classes: the points (u + i) / S, u ~ U[0, 1) per row, looked up on the CDF."""
    cdf = probs.cumsum(dim=1)
    cdf[:, -1] = 1.0  # rounding must not leave a point past the last class
    start = torch.rand(len(probs), 1, generator=generator, dtype=probs.dtype)
    points = (start + torch.arange(num_draws, dtype=probs.dtype)) / num_draws
    return torch.searchsorted(cdf, points, right=True).clamp_max(probs.shape[1] - 1)


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
        dense = torch.zeros_like(probs, dtype=torch.int32).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int32)
        )
        top_counts, top = dense.topk(num_draws, dim=1)
        drawn = top_counts > 0
        ascending, order = torch.where(drawn, top, probs.shape[1]).sort(dim=1)
        last = ascending.gather(1, drawn.sum(dim=1, keepdim=True) - 1)
        classes[rows] = torch.where(drawn, ascending, last).numpy()
        counts[rows] = top_counts.gather(1, order).numpy()
    return classes, counts
