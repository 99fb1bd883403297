"""Which stored view each sample gets in each epoch, and the sampler that yields those rows.

Row ``sample * V + view`` of a store with V views holds that view's logits. Epochs are grouped
in cycles of V: within a cycle every sample gets each of its views exactly once, in an order
that differs between samples and between cycles, so with V >= epochs no view repeats (as FKD
replays its crops) and with fewer views each is used equally often. Everything is a pure
function of ``(seed, sample, epoch)``: the cached and the online run draw the same views.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Sampler

from kdcache.errors import ConfigError

if TYPE_CHECKING:
    from kdcache.store.read.feed import Feed

#: Keys the view order's generators apart from every other use of the run's seed.
_ORDER_TAG = 0x5649_4557


def view_of(
    samples: np.ndarray, epoch: int, *, views: int, seed: int, num_samples: int
) -> np.ndarray:
    """The view of each of ``samples`` used in ``epoch`` (0-based)."""
    samples = np.asarray(samples, dtype=np.int64)
    if views == 1:
        return np.zeros_like(samples)
    offsets = np.random.default_rng([seed, _ORDER_TAG]).integers(0, views, num_samples)
    cycle, position = divmod(epoch, views)
    # A permutation per cycle keeps consecutive cycles from replaying one sequence of views.
    permutation = np.random.default_rng([seed, _ORDER_TAG, cycle]).permutation(views)
    return permutation[(offsets[samples] + position) % views]


class ViewSampler(Sampler[int]):
    """Yields, per epoch, one row per sample (``sample * V + view_of(...)``) in a shuffled order.

    Given a chunked :class:`~kdcache.store.read.feed.Feed`, samples come in the feed's chunk
    order (each chunk decoded once per epoch; with V views, 1/V of its rows are used); otherwise
    in a seeded permutation. With ``with_epoch`` the sampler yields ``epoch * N * V + row``
    instead, for datasets that also draw per-epoch student-only augmentation.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        views: int,
        seed: int = 0,
        feed: Feed | None = None,
        with_epoch: bool = False,
    ) -> None:
        if views < 1:
            raise ConfigError(f"views must be >= 1, got {views}")
        self.num_samples = num_samples
        self.views = views
        self.seed = seed
        self.feed = feed if feed is not None and feed.mode == "chunked" else None
        self.with_epoch = with_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The store rows epoch ``epoch`` visits, in visiting order (each sample exactly once)."""
        n, v = self.num_samples, self.views
        if self.feed is not None:
            rows = self.feed.epoch_order(epoch, seed=self.seed)
            samples = rows // v
            return rows[rows % v == view_of(samples, epoch, views=v, seed=self.seed, num_samples=n)]
        samples = np.random.default_rng([self.seed, epoch]).permutation(n)
        return samples * v + view_of(samples, epoch, views=v, seed=self.seed, num_samples=n)

    def __iter__(self) -> Iterator[int]:
        rows = self.epoch_rows(self.epoch)
        if self.with_epoch:
            rows = rows + self.epoch * self.num_samples * self.views
        self.epoch += 1
        return iter(rows.tolist())
