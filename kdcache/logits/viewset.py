"""``viewset:M``: the views of one sample share a set of M classes; each view keeps a few bits
per class of that set.

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
import torch

from kdcache.errors import ConfigError
from kdcache.logits.encodings import Encoding, Layout, index_dtype
from kdcache.logits.sparse import TAIL_STATS, SparseLogits, tail_statistics

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


class ViewSetEncoding(Encoding):
    """A per-sample class set shared by the sample's views, with BITS-bit offsets per view."""

    is_sparse = True

    def __init__(
        self, set_size: int, *, bits: int = DEFAULT_BITS, num_classes: int | None = None
    ) -> None:
        self.set_size = set_size
        self.bits = bits
        self.name = f"viewset:{set_size}" + ("" if bits == DEFAULT_BITS else f":{bits}")
        self.num_classes = num_classes
        levels = (1 << bits) - 1
        #: The decoded offset of each code, 0 (the maximum) down to -DEPTH.
        self.grid = (-DEPTH * (np.arange(levels + 1) / levels) ** 2).astype(np.float32)

    def layout(self, num_classes: int) -> Layout:
        if self.set_size >= num_classes:
            raise ConfigError(
                f"encoding {self.name} keeps a set of {self.set_size} classes but the store has "
                f"only {num_classes}; use viewset:M with M < {num_classes}, or float16 to keep "
                "every class"
            )
        return {
            "set_indices": ((self.set_size,), index_dtype(num_classes)),
            "set_codes": ((self.set_size,), np.dtype("uint8")),
            "row_max": ((), np.dtype("float16")),
            "tail_codes": ((len(TAIL_STATS),), np.dtype("uint8")),
        }

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return self.encode_views(logits, np.arange(len(logits)))

    def encode_views(self, logits: np.ndarray, samples: np.ndarray) -> dict[str, np.ndarray]:
        layout = self.layout(logits.shape[1])
        row_max = logits.max(axis=1)
        offsets = logits - row_max[:, None]
        # Every decoded value is the stored maximum plus an offset from the true one: rounding
        # the maximum to a quarter nat shifts a whole row alike, which no softmax sees, and
        # leaves float16 fewer distinct low bytes to compress.
        stored_max = (np.rint(row_max * 4.0) / 4.0).astype(np.float16)
        sets = self._class_sets(offsets, np.asarray(samples))
        kept = np.take_along_axis(offsets, sets, axis=1)
        steps = len(self.grid) - 1
        companded = np.sqrt(np.clip(-kept / DEPTH, 0.0, 1.0))
        codes = np.rint(companded * steps).astype(np.uint8)
        # Level 0 is the view's top class alone: a runner-up rounded up to it would tie with it,
        # and the decoded row could name another top class.
        codes[(codes == 0) & (kept < 0)] = 1
        tail = tail_statistics(logits, sets).numpy().astype(np.float64)
        return {
            "set_indices": sets.astype(layout["set_indices"][1]),
            "set_codes": codes,
            "row_max": stored_max,
            "tail_codes": self._tail_codes(tail, row_max.astype(np.float64)),
        }

    def _class_sets(self, offsets: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """The class set of every row (B, M), ascending: every view's top class, then its
        sample's classes with the largest softmax probability (T = 1) summed over the sample's
        rows in this block, i.e. the set that leaves the least mass to the uniform tail on
        average over the views."""
        inverse = np.unique(samples, return_inverse=True)[1]
        probs = np.exp(offsets)
        probs /= probs.sum(axis=1, keepdims=True)
        # More than any sum of probabilities: a view's top class comes before every other.
        probs[np.arange(len(probs)), offsets.argmax(axis=1)] += len(probs)
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.diff(inverse[order], prepend=-1))
        mass = np.add.reduceat(probs[order], starts, axis=0)
        chosen = np.argpartition(mass, -self.set_size, axis=1)[:, -self.set_size :]
        return np.sort(chosen, axis=1)[inverse]

    @staticmethod
    def _tail_codes(tail: np.ndarray, row_max: np.ndarray) -> np.ndarray:
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

    def sparse(self, arrays: dict[str, np.ndarray]) -> SparseLogits:
        if self.num_classes is None:
            raise ConfigError(
                f"encoding {self.name} needs the number of classes to reconstruct rows; "
                f"get it with parse_encoding({self.name!r}, num_classes=C)"
            )
        row_max = np.asarray(arrays["row_max"], dtype=np.float32)[:, None]
        grid = self.grid[np.minimum(arrays["set_codes"], len(self.grid) - 1)]
        values = torch.from_numpy(row_max + grid)
        indices = torch.from_numpy(arrays["set_indices"].astype(np.int64))
        order = torch.argsort(values, dim=1, descending=True, stable=True)
        chain = np.cumsum(arrays["tail_codes"][:, list(_TAIL_CHAIN)], axis=1, dtype=np.float32)
        tail = np.empty_like(chain)
        tail[:, list(_TAIL_CHAIN)] = row_max - TAIL_STEP * chain
        return SparseLogits(
            values=values.gather(1, order),
            indices=indices.gather(1, order),
            tail=torch.from_numpy(tail),
            num_classes=self.num_classes,
        )

    def decode(
        self, arrays: dict[str, np.ndarray], *, temperature: float | None = None
    ) -> np.ndarray:
        if temperature is None:
            raise ConfigError(
                f"a dense {self.name} row depends on the temperature it is softened at: pass "
                "temperature=T (the one you distill at), or use the sparse rows, which every "
                "loss softens at its own temperature"
            )
        return self.sparse(arrays).dense(temperature).numpy()
