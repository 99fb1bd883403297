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
from kdcache.store.read.feed import Feed

#: What a text file of indices may hold: ASCII integers separated by white space or commas.
_INDEX = re.compile(r"[-+]?[0-9]+")
_SEPARATORS = re.compile(r"[\s,]+", re.ASCII)
#: The largest index a file may name (an int64); a larger number is no sample of any dataset.
_MAX_INDEX = 2**63 - 1
_TEXT_FORM = (
    "expected integer sample indices separated by spaces, commas or newlines (or a .npy file)"
)


def read_indices(path: str) -> np.ndarray:
    """Sample indices from a ``.npy`` file or a text file of integers (spaces, commas, lines).

    Anything else in a text file (a sign or digit that is not ASCII, bytes that are not text, a
    number beyond int64) is refused in one line naming the file and the line.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"--indices file {path} not found; expected a .npy file or a text file of sample "
            "indices"
        )
    if file.suffix == ".npy":
        return _read_npy(file, path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read --indices file {path}: {error.strerror or error}") from None
    values: list[int] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"--indices file {path} line {number} holds byte 0x{line[error.start]:02x}, "
                f"which is not ASCII text; {_TEXT_FORM}"
            ) from None
        for token in _SEPARATORS.split(text.strip()):
            if not token:
                continue
            if not _INDEX.fullmatch(token):
                raise ConfigError(
                    f"--indices file {path} line {number} holds {_shown(token)}; {_TEXT_FORM}"
                )
            digits = token.lstrip("-+").lstrip("0")
            # Compared as text first: int() of thousands of digits is refused or slow.
            if len(digits) > len(str(_MAX_INDEX)) or int(digits or "0") > _MAX_INDEX:
                raise ConfigError(
                    f"--indices file {path} line {number} holds {_shown(token)}, beyond any "
                    "sample index "
                    f"(at most {_MAX_INDEX:,}); {_TEXT_FORM}"
                )
            values.append(int(token))
    return np.array(values, dtype=np.int64)


def _shown(token: str, limit: int = 32) -> str:
    """``token`` quoted for a message, cut short: a binary file may hold one huge token."""
    return repr(token if len(token) <= limit else token[:limit] + "...")


def _read_npy(file: Path, path: str) -> np.ndarray:
    try:
        values = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ConfigError(
            f"cannot read --indices file {path} as a .npy array ({type(error).__name__}); "
            "write it with numpy.save(path, indices) from integer sample indices"
        ) from None
    if not isinstance(values, np.ndarray):  # a .npz archive under a .npy name
        raise ConfigError(
            f"--indices file {path} is not a .npy array; expected a 1-D array of integer sample "
            "indices"
        )
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ConfigError(
            f"--indices file {path} holds a {values.dtype} array of shape {values.shape}; "
            "expected a 1-D array of integer sample indices"
        )
    if values.dtype == np.uint64 and values.size and int(values.max()) > _MAX_INDEX:
        raise ConfigError(
            f"--indices file {path} holds {int(values.max())}, beyond any sample index "
            f"(at most {_MAX_INDEX:,})"
        )
    return values.astype(np.int64)


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


def refuse_transfer_set_with_views(rows: np.ndarray | None, *, views: bool) -> None:
    """Refuse a transfer set (``rows``) in a run with views, which cannot train on one yet."""
    if views and rows is not None:
        raise ConfigError(
            "a transfer set (--indices, --exclude-classes) cannot be combined with views "
            "(--augment or a store with views) yet; distill on every sample, or dump a store "
            "of the transfer set"
        )


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

    def __init__(self, rows: np.ndarray, *, seed: int, feed: Feed | None = None) -> None:
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
