"""Transfer sets: which samples of the store's dataset a distillation trains on.

The store holds the teacher's rows for every sample of a dataset; a run may train on a subset
(``indices``), without some classes (``exclude_classes``), or on samples without labels (label
-1, e.g. ``unlabeled:SPEC``), which only the soft targets can teach (``alpha`` 1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from kdcache.config import DistillConfig
from kdcache.data.datasets import LabeledDataset
from kdcache.errors import ConfigError
from kdcache.store.read.feed import LogitFeed


def read_indices(path: str) -> np.ndarray:
    """Sample indices from a ``.npy`` file or a text file of integers (spaces, commas, lines)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"--indices file {path} not found; expected a .npy file or a text file of sample "
            "indices"
        )
    if file.suffix == ".npy":
        try:
            values = np.load(file, allow_pickle=False)
        except ValueError as error:
            raise ConfigError(f"cannot read --indices file {path} as .npy: {error}") from None
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ConfigError(
                f"--indices file {path} holds a {values.dtype} array of shape {values.shape}; "
                "expected a 1-D array of integer sample indices"
            )
        return values.astype(np.int64)
    tokens = [token for token in re.split(r"[\s,]+", file.read_text()) if token]
    try:
        return np.array([int(token) for token in tokens], dtype=np.int64)
    except ValueError:
        bad = next(token for token in tokens if not token.lstrip("-").isdigit())
        raise ConfigError(
            f"--indices file {path} holds {bad!r}; expected integer sample indices separated by "
            "spaces, commas or newlines (or a .npy file)"
        ) from None


def transfer_rows(config: DistillConfig, dataset: LabeledDataset) -> np.ndarray | None:
    """The sample indices of the run's transfer set (sorted), or None for the whole dataset.

    Refuses indices outside the dataset or listed twice, classes it does not have, an empty
    transfer set, and samples without a label when the hard-label term needs them (alpha < 1).
    """
    n, labels = len(dataset), dataset.labels
    rows: np.ndarray | None = None
    if config.indices is not None:
        given = (
            read_indices(config.indices)
            if isinstance(config.indices, str)
            else np.asarray(config.indices, dtype=np.int64)
        )
        outside = given[(given < 0) | (given >= n)]
        if outside.size:
            raise ConfigError(
                f"--indices holds {outside.size} indices outside [0, {n}) (e.g. {outside[0]}); "
                f"dataset {dataset.spec!r} ({dataset.split}) has {n} samples"
            )
        rows, counts = np.unique(given, return_counts=True)
        if (counts > 1).any():
            raise ConfigError(
                f"--indices lists sample {rows[counts > 1][0]} more than once "
                f"({int((counts > 1).sum())} repeated); list each sample once"
            )
    if config.exclude_classes:
        excluded = class_indices(config.exclude_classes, dataset)
        if (labels < 0).all():
            raise ConfigError(
                f"--exclude-classes needs labels but dataset {dataset.spec!r} has none; drop it, "
                "or select samples with --indices"
            )
        keep = ~np.isin(labels, excluded)
        rows = np.flatnonzero(keep) if rows is None else rows[keep[rows]]
    if rows is not None and rows.size == 0:
        raise ConfigError(
            f"the transfer set is empty: --indices and --exclude-classes leave no sample of "
            f"dataset {dataset.spec!r} ({dataset.split})"
        )
    chosen_labels = labels if rows is None else labels[rows]
    unlabeled = int((chosen_labels < 0).sum())
    if unlabeled and config.alpha < 1:
        raise ConfigError(
            f"{unlabeled} samples of the transfer set have no label (dataset {dataset.spec!r}); "
            f"the hard-label term needs labels: use --alpha 1 (soft targets only), got --alpha "
            f"{config.alpha:g}"
        )
    return rows


def describe_transfer(rows: np.ndarray | None, dataset: LabeledDataset) -> dict[str, Any]:
    """What config.json records of the transfer set: size, hash of its indices, unlabeled count."""
    labels = dataset.labels if rows is None else dataset.labels[rows]
    chosen = np.arange(len(dataset), dtype=np.int64) if rows is None else rows
    return {
        "num_samples": int(chosen.size),
        "of": len(dataset),
        "indices_sha256": hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest(),
        "unlabeled_samples": int((labels < 0).sum()),
    }


class TransferSampler(Sampler[int]):
    """The transfer set's sample indices, in a new seeded order each epoch.

    With a chunked logit feed the order is the feed's chunk-aware one, restricted to the transfer
    set, so each chunk is still decoded once per epoch.
    """

    def __init__(self, rows: np.ndarray, *, seed: int, feed: LogitFeed | None = None) -> None:
        self.rows, self.seed = rows, seed
        self.feed = feed if feed is not None and feed.mode == "chunked" else None
        self.epoch = 0
        if self.feed is not None:
            self._member = np.zeros(self.feed.num_samples, dtype=bool)
            self._member[rows] = True

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        if self.feed is not None:
            order = self.feed.epoch_order(self.epoch, seed=self.seed)
            order = order[self._member[order]]
        else:
            order = self.rows[
                np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
            ]
        self.epoch += 1
        return iter(order.tolist())


def class_indices(classes: Sequence[int | str], dataset: LabeledDataset) -> list[int]:
    """The indices of ``classes``, given by index or by the name the dataset gives the class."""
    names = list(dataset.class_names or ())
    choices = f"classes 0 to {dataset.num_classes - 1}" + (
        f" or {', '.join(names)}" if names else " (its classes have no names)"
    )
    indices = []
    for name in classes:
        index = names.index(name) if isinstance(name, str) and name in names else name
        if not isinstance(index, int) or not 0 <= index < dataset.num_classes:
            raise ConfigError(
                f"--exclude-classes names class {name!r} but dataset {dataset.spec!r} has {choices}"
            )
        indices.append(index)
    return indices
