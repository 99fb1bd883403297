"""``counter-v1``: the counter-based generator that draws view parameters, in bulk.

Every number a view's record needs is a pure function of ``(seed, stream, sample index, view,
draw number)``, computed with unsigned 64-bit integer arithmetic (wrapping modulo 2^64) on numpy
arrays. Nothing is carried from one draw to the next, so a table of millions of views is drawn a
chunk of rows at a time without a Python loop per view, and any subset of records, chunked in
any way, drawn in any order or in any process, comes out bit-identical::

    G         = 0x9E3779B97F4A7C15                       (2^64 / golden ratio, odd)
    mix(z)    = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
                z *= 0x94D049BB133111EB; z ^= z >> 31      (splitmix64's finalizer, a bijection)
    absorb(h, w) = mix((h ^ w) + G)
    key       = absorb(absorb(0, seed mod 2^64), stream)
    row       = absorb(absorb(key, index), view)
    bits(d)   = mix(row + (d + 1) * G)                     (splitmix64's d-th output from row)
    u(d)      = (bits(d) >> 11) * 2^-53                    uniform in [0, 1), 53 random bits

On it :class:`Draws` builds what the recipes need: an integer in ``[0, n)`` is ``floor(u(d) *
n)`` (bias below n / 2^53); a Bernoulli(p) is ``u(d) < p``; Beta(a, a) is Jöhnk's method for
a < 1 (up to 8 attempts on draws ``d .. d + 15``, accepted with probability >= 1/2 each; a view
whose attempts all fail, and every view for a >= 1, takes the exact inverse CDF
``scipy.special.betaincinv(a, a, u(d + 16))``). Each operation of a recipe owns a fixed block of
draw numbers (:meth:`Draws.at`), so which attempt succeeded never shifts another field's draws.

Integer arithmetic and ``+ - * / sqrt`` are exact or correctly rounded everywhere; ``exp`` and
``log`` come from numpy, whose SIMD versions may differ in the last bit between CPUs, which can
move a crop by a pixel only when a size lies within ~1e-16 of a rounding boundary. A store keeps
its drawn records, so cached runs never depend on redrawing them.
"""

from __future__ import annotations

import numpy as np

#: The generator's name as stores record it (``augment.sampler``).
NAME = "counter-v1"

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT = 2.0**-53
#: Jöhnk attempts for Beta(a, a), a < 1; each is accepted with probability >= 1/2.
BETA_ATTEMPTS = 8
#: Draw numbers a Beta variate uses: two per attempt, then one for the inverse CDF.
BETA_DRAWS = 2 * BETA_ATTEMPTS + 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _absorb(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = h ^ w
    z += np.uint64(_GOLDEN)
    return _mix(z)


def _words(values: int | np.ndarray) -> np.ndarray:
    """Integers as uint64 words (modulo 2^64, so a negative number wraps)."""
    if isinstance(values, int):
        return np.array([values & _MASK], dtype=np.uint64)
    return np.asarray(values).astype(np.int64).view(np.uint64)


class Draws:
    """Uniform numbers for a batch of records, one row per ``(index, view)`` pair.

    ``rows`` arguments select a subset of the batch (positions into it); results follow it.
    """

    def __init__(self, keys: np.ndarray, offset: int = 0) -> None:
        self._keys = keys
        self._offset = offset

    @classmethod
    def of(cls, *, seed: int, stream: int, index: np.ndarray, view: np.ndarray) -> Draws:
        """The draws of records ``(index[i], view[i])`` under ``seed`` and ``stream``."""
        key = _absorb(_absorb(np.zeros(1, np.uint64), _words(seed)), _words(stream))
        return cls(_absorb(_absorb(key, _words(index)), _words(view)))

    def __len__(self) -> int:
        return len(self._keys)

    def at(self, offset: int) -> Draws:
        """The same records, draw numbers counted from ``offset`` on (an operation's block)."""
        return Draws(self._keys, self._offset + offset)

    def uniform(self, draw: int, rows: np.ndarray | None = None) -> np.ndarray:
        """``u(draw)``: float64 in [0, 1), 53 random bits."""
        keys = self._keys if rows is None else self._keys[rows]
        z = keys + np.uint64(((self._offset + draw + 1) * _GOLDEN) & _MASK)
        _mix(z)
        z >>= _S11
        return z * _UNIT

    def integers(
        self, draw: int, high: int | np.ndarray, rows: np.ndarray | None = None
    ) -> np.ndarray:
        """Integers uniform in ``[0, high)`` (``high`` >= 1, per row or one), as float64."""
        return np.minimum(np.floor(self.uniform(draw, rows) * high), np.subtract(high, 1))

    def beta(self, draw: int, alpha: float) -> np.ndarray:
        """Beta(alpha, alpha) variates from draws ``draw .. draw + BETA_DRAWS - 1``."""
        out = np.empty(len(self))
        pending: np.ndarray | None = None  # rows still without a variate; None: every row
        if alpha < 1:
            # Jöhnk (1964): X = U^(1/a), Y = V^(1/a); given X + Y <= 1, X / (X + Y) ~ Beta(a, a).
            # In logs, so that small a does not underflow; 1 - u lies in (0, 1].
            for attempt in range(BETA_ATTEMPTS):
                x = np.log1p(-self.uniform(draw + 2 * attempt, pending)) / alpha
                y = np.log1p(-self.uniform(draw + 2 * attempt + 1, pending)) / alpha
                total = np.logaddexp(x, y)
                # Every pending row takes this attempt's value; the rejected ones try again.
                out[slice(None) if pending is None else pending] = np.exp(x - total)
                rejected = total > 0
                pending = np.flatnonzero(rejected) if pending is None else pending[rejected]
                if not pending.size:
                    return out
        from scipy.special import betaincinv  # only for a >= 1 or the rare rejected views

        u = self.uniform(draw + 2 * BETA_ATTEMPTS, pending)
        out[slice(None) if pending is None else pending] = betaincinv(alpha, alpha, u)
        return out
