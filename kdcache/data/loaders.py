"""Batches of ``(input, label, index)``: the indexed dataset, the seeded loader, and each rank's
share of an epoch.

:class:`EpochShardSampler` gives each rank its share of a seeded epoch order: every index exactly
once per epoch across ranks, never padded with duplicates (unlike
``torch.utils.data.DistributedSampler``); ranks may get one sample more than others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from kdcache.errors import ResumeMismatchError


class IndexedDataset(Dataset):
    """Yields ``(input, label, index)`` so teacher logits can be paired by sample index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        inputs, label = self.dataset[index]
        return inputs, label, index


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    shuffle: bool,
    seed: int = 0,
    sampler: Sampler[int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A loader over ``(input, label, index)`` batches, seeded so runs repeat exactly; an epoch
    never ends on a batch of one sample (:class:`NoSingletonBatchSampler`).

    A ``sampler`` (e.g. a chunked logit feed's order) replaces the seeded shuffle; ``collate_fn``
    replaces the default stacking (e.g. for encoded files of different lengths).
    """
    indexed = IndexedDataset(dataset)
    generator = None
    if sampler is None:
        # What DataLoader(shuffle=...) would build, so the seeded orders stay as they were.
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        sampler = RandomSampler(indexed, generator=generator) if shuffle else None
    return DataLoader(
        indexed,
        batch_sampler=NoSingletonBatchSampler(
            range(len(indexed)) if sampler is None else sampler, batch_size
        ),
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


class NoSingletonBatchSampler(BatchSampler):
    """torch's ``BatchSampler`` keeping a last partial batch, except that a last batch of one
    sample joins the batch before it.

    BatchNorm cannot train on one sample where its input has one value per channel (a
    torchvision ResNet's last block on 32-pixel images, any ``BatchNorm1d``): without this, a
    training set (or a rank's share) one sample longer than a multiple of ``--batch-size``
    stopped each such run at its first epoch's end. ``batch_size`` 1 keeps its batches of one.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)  # type: ignore[arg-type]
        if rest == 1 and full > 0 and self.batch_size > 1:
            return full
        return full + (rest > 0)

    def __iter__(self) -> Iterator[list[int]]:
        held: list[int] | None = None
        for batch in super().__iter__():
            if held is not None and len(batch) == 1 and self.batch_size > 1:
                batch = held + batch
            elif held is not None:
                yield held
            held = batch
        if held is not None:
            yield held


class EpochShardSampler(Sampler[int]):
    """This rank's share of epoch orders 0, 1, 2, ... (one per iteration), each index once.

    ``order(epoch)`` gives every index once (default: a permutation seeded by ``(seed,
    epoch)``); rank r of K takes the r-th of K consecutive, near-equal slices of it, so the
    shares of one epoch never overlap and together hold every index.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        order: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._order = order
        self.epoch = 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is not None:
            return self._order(epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __len__(self) -> int:
        share, extra = divmod(self.num_samples, self.world_size)
        return share + (self.rank < extra)

    def __iter__(self) -> Iterator[int]:
        order = self._epoch_order(self.epoch)
        self.epoch += 1
        return iter(np.array_split(order, self.world_size)[self.rank].tolist())


def loader_order(loader: DataLoader) -> dict[str, Any]:
    """What decides the order of ``loader``'s next epoch: its shuffling generator's state, or
    the epoch its sampler is at (kdcache's samplers draw each epoch's order from it), and the
    window of a chunked logit feed it follows (None: it follows none)."""
    generator = loader.generator
    return {
        "generator": None if generator is None else generator.get_state(),
        "sampler_epoch": getattr(_index_sampler(loader), "epoch", None),
        "feed": _feed_window(_index_sampler(loader)),
    }


def _index_sampler(loader: DataLoader) -> Any:
    """The sampler that orders ``loader``'s samples (its batch sampler's)."""
    return loader.batch_sampler.sampler  # type: ignore[union-attr]


def _feed_window(sampler: Any) -> dict[str, int] | None:
    feed = getattr(sampler, "feed", None)
    if feed is None or feed.mode != "chunked":
        return None
    return {"window_chunks": feed.window_chunks, "memory_budget": feed.memory_budget}


def _reading(feed: dict[str, int] | None) -> str:
    if feed is None:
        return "whole in memory"
    return (
        f"chunk by chunk in windows of {feed['window_chunks']} chunks (--cache-memory "
        f"{feed['memory_budget']})"
    )


def restore_loader_order(
    loader: DataLoader, order: dict[str, Any], *, after_first_epoch: bool
) -> None:
    """Make ``loader``'s next epoch the one :func:`loader_order` described, as in a run that
    went through every epoch before it (``after_first_epoch``: that one was not the first).

    A chunked feed's window decides the order too; another one (its ``--cache-memory`` budget,
    by default half the free memory, moved) is refused in one line."""
    saved, now = order.get("feed"), _feed_window(_index_sampler(loader))
    if saved != now:
        raise ResumeMismatchError(
            f"the interrupted run read its store's logits {_reading(saved)}, this run would read "
            f"them {_reading(now)}, and the order of the batches follows from it; give "
            + (
                f"--cache-memory {saved['memory_budget']} as the run had"
                if saved
                else "--cache-memory at least the store's size, as the run had"
            )
        )
    if loader.persistent_workers and after_first_epoch:
        # Such a run made its workers once, in its first epoch, drawing their seed from the
        # generator (or torch's); a fresh iterator would draw it now, shifting the order. Made
        # first, it draws before the states below are put back.
        iter(loader)
    if (order["generator"] is None) != (loader.generator is None):
        raise ResumeMismatchError(
            "the interrupted run and this one draw their order differently (a shuffling "
            "generator against a sampler's): resume with the options and torchrun ranks the "
            "run had"
        )
    if order["generator"] is not None:
        loader.generator.set_state(order["generator"])
    if order["sampler_epoch"] is not None:
        _index_sampler(loader).epoch = order["sampler_epoch"]
