"""The sparse form of teacher logits: the K largest raw logits plus statistics of the other classes.

A ``topk:K`` store keeps, per row, the K largest logits ``v`` (descending), their class indices,
and six statistics of the ``n = C - K`` remaining ("tail") logits ``d``: their max ``m``, their
mean ``mu`` and, at the knot temperatures ``T_k`` in :data:`KNOT_TEMPERATURES`, the *effective
tail logit*

    z(T) = T * log( (1/n) * sum_j exp(d_j / T) )

i.e. the single value which, given to all n tail classes, reproduces the tail's total softmax
mass at temperature T exactly. Seen as a function of t = 1/T, z is the scaled cumulant generating
function of the tail values; it increases from ``mu`` (t = 0, T = inf) to ``m`` (t -> inf, T -> 0).
For any T > 0 :meth:`SparseLogits.tail_logit` interpolates z between the stored knots
(t = 0, 1/8, 1/4, 1/2, 1) with a shape-preserving cubic (PCHIP, Fritsch & Carlson 1980), exact at
the knots; below T = 1 it lets ``t * (z(t) - m)`` decay exponentially from its t = 1 value to
its limit ``-log n``, so z tends to ``m``.
docs/encodings.md derives this and measures the error between knots.

Given z(T), the best dense reconstruction with no knowledge of which tail class holds which logit
is the stored top-k plus z(T) in every tail class: it gives the tail its exact total mass, spread
uniformly (FKD's "marginal smoothing", but with the mass right at any temperature chosen at
training time).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import ConfigError

#: Temperatures at which the effective tail logit is stored exactly.
KNOT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
#: Order of the per-row tail statistics: tail max, tail mean, then z(T) at each knot temperature.
TAIL_STATS = ("max", "mean", *(f"z_t{int(t)}" for t in KNOT_TEMPERATURES))


@dataclass(frozen=True)
class SparseLogits:
    """Teacher logits of a batch in sparse form, as read from a ``topk:K`` store.

    ``values`` (B, K): the K largest raw logits of each row, descending. ``indices`` (B, K): their
    class indices (int64). ``tail`` (B, 6): the statistics of the other ``num_classes - K`` logits
    in :data:`TAIL_STATS` order. Nothing here is (B, C): losses use it directly.
    """

    values: Tensor
    indices: Tensor
    tail: Tensor
    num_classes: int

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the dense logits this stands for, (B, C)."""
        return (self.values.shape[0], self.num_classes)

    @property
    def num_tail(self) -> int:
        return self.num_classes - self.values.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SparseLogits:
        """Move to ``device`` (and cast values and statistics to ``dtype`` when given)."""
        return SparseLogits(
            values=self.values.to(
                device=device, dtype=dtype or self.values.dtype, non_blocking=True
            ),
            indices=self.indices.to(device, non_blocking=True),
            tail=self.tail.to(device=device, dtype=dtype or self.tail.dtype, non_blocking=True),
            num_classes=self.num_classes,
        )

    def detach(self) -> SparseLogits:
        return SparseLogits(
            self.values.detach(), self.indices.detach(), self.tail.detach(), self.num_classes
        )

    def tail_logit(self, temperature: float) -> Tensor:
        """The effective tail logit z(T), shape (B,): every tail class gets this value at T."""
        return interpolate_tail_logit(self.tail, temperature, self.num_tail)

    def log_probs(self, temperature: float) -> tuple[Tensor, Tensor]:
        """log p_T of the K stored classes (B, K) and of the whole tail's mass (B,).

        Each tail class has probability ``exp(tail_log_mass) / num_tail``; with no tail the mass
        is zero (log = -inf).
        """
        top = self.values / temperature
        if self.num_tail == 0:
            return torch.log_softmax(top, dim=1), torch.full_like(top[:, 0], -math.inf)
        tail = self.tail_logit(temperature) / temperature + math.log(self.num_tail)
        normalizer = torch.logsumexp(torch.cat([top, tail[:, None]], dim=1), dim=1, keepdim=True)
        return top - normalizer, tail - normalizer[:, 0]

    def entropy(self, temperature: float) -> Tensor:
        """Entropy (nats) of p_T per row, shape (B,), with the tail mass spread uniformly."""
        top, tail = self.log_probs(temperature)
        entropy = -(top.exp() * top).nan_to_num().sum(dim=1)
        if self.num_tail:
            mass = tail.exp()
            entropy = entropy - torch.where(mass > 0, mass * (tail - math.log(self.num_tail)), 0.0)
        return entropy

    def dense(self, temperature: float) -> Tensor:
        """Dense raw logits (B, C) whose softmax at ``temperature`` is the best reconstruction."""
        fill = self.tail_logit(temperature) if self.num_tail else self.values[:, -1]
        out = fill[:, None].expand(-1, self.num_classes).clone()
        return out.scatter_(1, self.indices, self.values)

    @staticmethod
    def cat(parts: Sequence[SparseLogits]) -> SparseLogits:
        """The rows of ``parts`` (all of one store) stacked into one batch, in order."""
        if not parts:
            raise ConfigError("SparseLogits.cat needs at least one part")
        return SparseLogits(
            values=torch.cat([part.values for part in parts]),
            indices=torch.cat([part.indices for part in parts]),
            tail=torch.cat([part.tail for part in parts]),
            num_classes=parts[0].num_classes,
        )

    def __len__(self) -> int:
        return self.values.shape[0]

    def rows(self) -> list[SparseLogits]:
        """Every row as a one-row batch (views, no copies)."""
        return [
            SparseLogits(values, indices, tail, self.num_classes)
            for values, indices, tail in zip(
                self.values.split(1), self.indices.split(1), self.tail.split(1), strict=True
            )
        ]

    def __getitem__(self, rows: int | slice | Tensor) -> SparseLogits:
        """Rows of the batch, always as a batch: ``sparse[3]`` has shape (1, C)."""
        if isinstance(rows, int):
            if not -len(self) <= rows < len(self):  # ends iteration, as for a tensor
                raise IndexError(f"row {rows} out of range for a batch of {len(self)} rows")
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return SparseLogits(
            self.values[rows], self.indices[rows], self.tail[rows], self.num_classes
        )


#: Teacher logits as the losses accept them: dense (B, C), or sparse from a ``topk:K`` store.
TeacherInput = Tensor | SparseLogits


def as_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    """``values`` as a numpy array (a tensor is detached and brought to the host first)."""
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


#: Rows :func:`tail_statistics` works on at a time: a block's temporaries (a few rows of C
#: values) stay in the core's cache, where whole-batch temporaries went to memory once per pass.
TAIL_BLOCK_ELEMENTS = 1 << 17


def tail_statistics(logits: Tensor | np.ndarray, kept: Tensor | np.ndarray) -> Tensor:
    """The :data:`TAIL_STATS` of the classes of ``logits`` (B, C) not in ``kept`` (B, K), (B, 6).

    Exponents are of ``d - max <= 0`` (nothing overflows) in the input's dtype (at least
    float32), sums in float64. Computed with numpy, which runs one core per call and releases
    the GIL: the store writer's encoder threads then scale, where torch's shared intra-op pool
    made parallel callers wait on each other. Needs K < C. Each row's statistics depend on that
    row alone, so blocks of rows give the same bits as the whole batch at once.
    """
    values = as_numpy(logits)
    values = values.astype(np.promote_types(values.dtype, np.float32), copy=False)
    columns = as_numpy(kept)
    step = max(1, TAIL_BLOCK_ELEMENTS // max(1, values.shape[1]))
    stats = np.empty((values.shape[0], len(TAIL_STATS)), dtype=values.dtype)
    work = np.empty((min(step, len(values)), values.shape[1]), dtype=values.dtype)
    for start in range(0, len(values), step):
        stop = min(start + step, len(values))
        _tail_block(
            values[start:stop], columns[start:stop], work[: stop - start], stats[start:stop]
        )
    return torch.from_numpy(stats)


def _tail_block(values: np.ndarray, columns: np.ndarray, work: np.ndarray, out: np.ndarray) -> None:
    """:func:`tail_statistics` of one block of rows into ``out``, ``work`` its scratch rows."""
    num_tail = values.shape[1] - columns.shape[1]
    np.copyto(work, values)
    np.put_along_axis(work, columns, -np.inf, axis=1)
    top = work.max(axis=1)
    total = values.sum(axis=1, dtype=np.float64)
    mean = total - np.take_along_axis(values, columns, axis=1).sum(axis=1, dtype=np.float64)
    work -= top[:, None]
    # One exp at the largest knot temperature, then a squaring for each halving of T
    # (exp(x / (T/2)) = exp(x / T)^2): an exp per element costs several times a multiply.
    sums: dict[float, np.ndarray] = {}
    power_t = None
    for t in sorted(KNOT_TEMPERATURES, reverse=True):
        if power_t == 2 * t:
            np.square(work, out=work)
        else:
            np.divide(work, t, out=work)
            np.exp(work, out=work)
        power_t = t
        sums[t] = work.sum(axis=1, dtype=np.float64)
    knots = [top + t * np.log(sums[t] / num_tail) for t in KNOT_TEMPERATURES]
    out[:] = np.stack([top, mean / num_tail, *knots], axis=1)


# The knots in t = 1/T, ascending: t = 0 holds the mean, then T = 8, 4, 2, 1.
_KNOT_T = (0.0, *(1.0 / t for t in reversed(KNOT_TEMPERATURES)))


def _pchip_end_slope(h0: float, h1: float, d0: Tensor, d1: Tensor) -> Tensor:
    """The three-point slope at an end knot, kept shape-preserving (as scipy's PCHIP)."""
    slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    slope = torch.where(torch.sign(slope) != torch.sign(d0), torch.zeros_like(slope), slope)
    overshoot = (torch.sign(d0) != torch.sign(d1)) & (slope.abs() > 3 * d0.abs())
    return torch.where(overshoot, 3 * d0, slope)


def _pchip_slopes(h: list[float], delta: Tensor) -> Tensor:
    """Fritsch-Carlson slopes (B, knots) for knot spacings ``h`` and secant slopes ``delta``."""
    slopes = [_pchip_end_slope(h[0], h[1], delta[:, 0], delta[:, 1])]
    for k in range(1, len(h)):
        w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
        left, right = delta[:, k - 1], delta[:, k]
        same_sign = left * right > 0
        # Weighted harmonic mean where the data are monotone, a flat slope at an extremum.
        harmonic = (w1 + w2) / (
            w1 / torch.where(same_sign, left, 1.0) + w2 / torch.where(same_sign, right, 1.0)
        )
        slopes.append(torch.where(same_sign, harmonic, torch.zeros_like(left)))
    slopes.append(_pchip_end_slope(h[-1], h[-2], delta[:, -1], delta[:, -2]))
    return torch.stack(slopes, dim=1)


def _extrapolate_below_one(
    top: Tensor, z_one: Tensor, z_slope: Tensor, t: float, num_tail: int
) -> Tensor:
    """z at t = 1/T > 1 from psi(t) = t (z(t) - m) = log mean exp(t (d - m)).

    psi is convex and decreasing from psi(1) towards -log(n) (one tail class at the max); it
    decays exponentially towards that floor, starting with the slope psi'(1) = z(1) - m + z'(1)
    that the interpolant has at t = 1.
    """
    floor = -math.log(num_tail)
    psi_one = z_one - top
    above = (psi_one - floor).clamp_min(1e-12)
    rate = (-(psi_one + z_slope) / above).clamp_min(0.0)
    return top + (floor + above * torch.exp(-(t - 1.0) * rate)) / t


def interpolate_tail_logit(tail: Tensor, temperature: float, num_tail: int) -> Tensor:
    """z(T) for every row of tail statistics ``tail`` (B, 6) of ``num_tail`` classes, any T > 0."""
    t = 1.0 / float(temperature)
    top = tail[:, 0]
    knots = torch.cat([tail[:, 1:2], tail[:, 2:].flip(1)], dim=1)  # values at _KNOT_T
    h = [b - a for a, b in itertools.pairwise(_KNOT_T)]
    delta = (knots[:, 1:] - knots[:, :-1]) / torch.tensor(h, dtype=knots.dtype, device=knots.device)
    slopes = _pchip_slopes(h, delta)
    if t >= 1.0:
        return _extrapolate_below_one(top, knots[:, -1], slopes[:, -1], t, num_tail)
    segment = max(k for k in range(len(_KNOT_T) - 1) if _KNOT_T[k] <= t)
    width = h[segment]
    s = (t - _KNOT_T[segment]) / width
    h00, h10, h01, h11 = (
        2 * s**3 - 3 * s**2 + 1,
        s**3 - 2 * s**2 + s,
        -2 * s**3 + 3 * s**2,
        s**3 - s**2,
    )
    return (
        h00 * knots[:, segment]
        + h10 * width * slopes[:, segment]
        + h01 * knots[:, segment + 1]
        + h11 * width * slopes[:, segment + 1]
    )
