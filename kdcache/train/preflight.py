"""Checks of a run's inputs that must pass before its folder or store is created, so that a
refused command leaves nothing behind (a misspelt model would otherwise fail only once the run
folder and its ``config.json`` exist)."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.config import DistillConfig
from kdcache.data.datasets import LabeledDataset, build_dataset
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.models import build_model, check_input_fits
from kdcache.store.read.reader import StoreReader
from kdcache.train.pairing import check_store_matches
from kdcache.train.transfer import refuse_transfer_set_with_views, transfer_rows
from kdcache.train.views import check_view_options


def check_model(spec: str, dataset: LabeledDataset) -> None:
    """Build the model ``spec`` names for ``dataset`` and run it on one input's shape, on the meta
    device: no memory is allocated, and the global random state is left as it was (the run's
    model is built again from its seed)."""
    shape = tuple(dataset.float_input(0).shape)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(spec, num_classes=dataset.num_classes, in_channels=dataset.in_channels)
        check_input_fits(model, shape, spec=spec)


def store_dataset(reader: StoreReader, spec: str | None, split: str | None) -> LabeledDataset:
    """The dataset a store's rows belong to: ``spec``/``split``, else those the store records,
    checked against the store."""
    recorded = reader.metadata.dataset or {}
    spec = spec or recorded.get("spec")
    if spec is None:
        raise StoreMismatchError(
            f"{reader.where} records no dataset; pass --dataset SPEC (and --split) to say which "
            "one it belongs to"
        )
    dataset = build_dataset(spec, split=split or recorded.get("split") or "train")
    check_store_matches(reader, dataset)
    return dataset


def check_store_run(
    config: DistillConfig, reader: StoreReader, dataset: LabeledDataset
) -> np.ndarray | None:
    """What a run from a store may be refused for, short of its model and its views' pixels:
    view options against the store's, the transfer set (``--indices`` read and checked) and
    their combination. Returns the transfer set's rows (None for every sample)."""
    check_view_options(
        reader, augment=config.augment, augment_seed=config.augment_seed, views=config.views
    )
    check_top_k(config, reader)
    rows = transfer_rows(config, dataset)
    views = reader.metadata.augment is not None or config.student_augment is not None
    refuse_transfer_set_with_views(rows, views=views)
    return rows


def check_top_k(config: DistillConfig, reader: StoreReader) -> None:
    """The attention loss keeps the teacher's ``--top-k`` classes: at most the store's classes,
    and at most the K a ``topk:K`` store keeps (beyond them the tail classes tie)."""
    if config.loss != "attention":
        return
    kept = getattr(reader.encoding, "k", reader.num_classes)
    if config.top_k > kept:
        raise ConfigError(
            f"--top-k {config.top_k} exceeds the {kept} classes {reader.where} keeps "
            f"({reader.metadata.encoding}, C={reader.num_classes}); pass --top-k {kept} or less"
        )
