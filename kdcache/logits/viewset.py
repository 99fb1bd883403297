"""The maths of ``viewset:M`` (kdcache.logits.encodings.ViewSetEncoding): the views of one
sample share a set of M classes; each view keeps a few bits per class of that set.

The V augmented views of one image mostly agree on which classes matter: their top classes come
from a small set. Per view (row) the encoding stores

- ``set_indices`` (M, the smallest unsigned type that holds C): the sample's class set, ascending,
  the same for all its views. Written next to each other (rows ``i * V .. i * V + V - 1``), the V
  copies cost the compressor one match: about 2M / V bytes a view.
- ``set_codes`` (M uint8): the view's logit for each class of the set as an offset from the
  view's maximum, ``d = z - max <= 0``, quantised to ``2^BITS`` levels on a companded grid
  ``d_k = -DEPTH * (k / (L - 1))^2``: fine near the maximum, where the softmax is decided,
  coarse far below it (the KL cost of an error ``e`` on class c is about ``p_c e^2 / 2``). An
  offset below ``-DEPTH`` is stored as ``-DEPTH``; level 0 is the view's top class alone, so the
  decoded row keeps its top class.
- ``row_max`` (float16): the view's maximum logit rounded to a quarter nat, so that the decoded
  logits are raw logits to within that shift of the whole row (which no softmax sees).
- ``tail_codes`` (6 uint8): the :data:`~kdcache.logits.sparse.TAIL_STATS` of the other C - M
  classes (their max, z(T) at T = 1, 2, 4, 8, and their mean: non-increasing in that order),
  each as the number of steps of :data:`TAIL_STEP` nats below the previous one (the first below
  the view's maximum): the reconstruction at any temperature of ``topk:K``
  (:mod:`kdcache.logits.sparse`) with statistics rounded to TAIL_STEP / 2.

The set is chosen per sample from all its views written together: every view's top class, then
the classes with the largest softmax probability (T = 1) summed over the views, the set that
leaves the least mass to the uniform tail on average. A view written without its siblings gets
a set of its own (its top M): the same fidelity, without the shared set's saving. Reading never
needs a sibling row.
"""

from __future__ import annotations

import numpy as np

from kdcache.logits.sparse import TAIL_STATS

#: Nats per step of the tail statistics' codes.
TAIL_STEP = 1.0 / 4.0
#: The quantiser's depth: the lowest level, in nats below the view's maximum.
DEPTH = 16.0
#: Code bits per class allowed in the spec ``viewset:M:BITS``.
MIN_BITS, MAX_BITS = 2, 8
DEFAULT_BITS = 4
#: The order the tail codes chain the statistics in (indices into TAIL_STATS): max, z(T) from
#: T = 1 up to 8, mean, each no larger than the one before.
_TAIL_CHAIN = (0, *range(2, len(TAIL_STATS)), 1)


def companded_grid(bits: int, depth: float = DEPTH) -> np.ndarray:
    """The decoded offset of each of the 2^bits codes, 0 (the maximum) down to -``depth``."""
    levels = (1 << bits) - 1
    return (-depth * (np.arange(levels + 1) / levels) ** 2).astype(np.float32)


def offset_codes(offsets: np.ndarray, bits: int, depth: float | np.ndarray = DEPTH) -> np.ndarray:
    """Codes (uint8) of offsets from the row's maximum (<= 0): the nearest level of
    :func:`companded_grid` in the companded domain sqrt(-d / depth). ``depth`` may be one per
    row (``(B, 1)``, each > 0); an offset below it is coded as it.

    The decoded offset of a code is within ``(sqrt(depth * -d) + depth / (4L)) / L`` of ``d``
    (L = 2^bits - 1 steps): fine near the maximum, at most about ``depth / L`` at the bottom."""
    steps = (1 << bits) - 1
    companded = np.sqrt(np.clip(-offsets / depth, 0.0, 1.0))
    codes = np.rint(companded * steps).astype(np.uint8)
    # Level 0 is the view's top class alone: a runner-up rounded up to it would tie with it,
    # and the decoded row could name another top class.
    codes[(codes == 0) & (offsets < 0)] = 1
    return codes


def class_sets(offsets: np.ndarray, samples: np.ndarray, set_size: int) -> np.ndarray:
    """The class set of every row (B, set_size), ascending: every view's top class, then its
    sample's classes with the largest softmax probability (T = 1) summed over the sample's rows
    (``samples`` names each row's sample), i.e. the set that leaves the least mass to the uniform
    tail on average over the views. ``offsets`` are each row's logits minus its maximum."""
    inverse = np.unique(samples, return_inverse=True)[1]
    probs = np.exp(offsets)
    probs /= probs.sum(axis=1, keepdims=True)
    # More than any sum of probabilities: a view's top class comes before every other.
    probs[np.arange(len(probs)), offsets.argmax(axis=1)] += len(probs)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.diff(inverse[order], prepend=-1))
    mass = np.add.reduceat(probs[order], starts, axis=0)
    chosen = np.argpartition(mass, -set_size, axis=1)[:, -set_size:]
    return np.sort(chosen, axis=1)[inverse]


def tail_codes(tail: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """The :data:`TAIL_STATS` ``tail`` (B, 6) of rows whose maximum is ``row_max`` (B,) as
    uint8 steps of :data:`TAIL_STEP`, each below the previous statistic of the chain."""
    chain = np.concatenate([row_max[:, None], tail[:, _TAIL_CHAIN]], axis=1)
    # Steps below the maximum, rounded, then made non-decreasing along the chain so that
    # each code is the (non-negative) difference from the one before.
    steps = np.rint((row_max[:, None] - chain[:, 1:]) / TAIL_STEP)
    steps = np.maximum.accumulate(np.maximum(steps, 0.0), axis=1)
    differences = np.diff(steps, axis=1, prepend=0.0)
    out = np.empty(differences.shape, dtype=np.uint8)
    # A difference beyond a byte saturates: the statistic then sits 255 steps (64 nats)
    # below the previous one, where its mass is negligible next to the set's.
    out[:, list(_TAIL_CHAIN)] = np.minimum(differences, 255.0)
    return out


def tail_from_codes(codes: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """The tail statistics (B, 6) float32 that :func:`tail_codes` encoded, below ``row_max``."""
    chain = np.cumsum(codes[:, list(_TAIL_CHAIN)], axis=1, dtype=np.float32)
    tail = np.empty_like(chain)
    tail[:, list(_TAIL_CHAIN)] = row_max[:, None] - TAIL_STEP * chain
    return tail
