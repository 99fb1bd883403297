"""What a ``kdcache train`` checkpoint records about itself (its model spec, dataset spec, classes
and channels), so that a teacher's ``--weights`` alone say which model to build and which dataset
it belongs to, and weights that do not fit the dataset in use are refused with a hint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdcache.data.datasets import LabeledDataset
from kdcache.errors import CheckpointError, ConfigError
from kdcache.models import canonical_model_spec, load_weights


@dataclass(frozen=True)
class CheckpointRecord:
    """A weights file's own record; ``None`` where it records nothing (a plain state_dict, a
    checkpoint written before kdcache recorded its dataset, or a file that does not load)."""

    path: str
    model: str | None = None
    dataset: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    loads: bool = False

    def describe(self) -> str:
        return "" if self.dataset is None else f", trained on dataset {self.dataset!r}"


def read_record(path: str | Path) -> CheckpointRecord:
    """The specs the checkpoint at ``path`` records."""
    if not Path(path).is_file():
        raise CheckpointError(f"weights file {path} not found; expected an existing file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # load_weights reports why when the weights are loaded
        return CheckpointRecord(str(path))
    if not isinstance(saved, Mapping):
        return CheckpointRecord(str(path))
    dataset = saved.get("dataset")

    def text(value: object) -> str | None:
        return value if isinstance(value, str) else None

    def integer(value: object) -> int | None:
        return value if isinstance(value, int) else None

    return CheckpointRecord(
        str(path),
        model=text(saved.get("model")),
        dataset=text(dataset.get("spec") if isinstance(dataset, Mapping) else None),
        num_classes=integer(saved.get("num_classes")),
        in_channels=integer(saved.get("in_channels")),
        loads=True,
    )


def resolve_specs(
    weights: str | None,
    *,
    model: str | None,
    dataset: str | None,
    model_option: str,
    default_dataset: str | None,
) -> tuple[str, str]:
    """The model spec and dataset spec of a run given ``model_option`` (``--teacher``) ``model``,
    ``--dataset`` ``dataset`` and ``--weights`` ``weights``: what is omitted comes from the
    checkpoint's record (the dataset, else ``default_dataset``); a model that contradicts the
    record is refused."""
    record = CheckpointRecord("") if weights is None else read_record(weights)
    if model is None:
        if record.model is None:
            raise ConfigError(
                f"no model given: pass {model_option} SPEC (e.g. {model_option} resnet18)"
                + (
                    ""
                    if weights is None
                    else f"; --weights {weights} records no model spec (not a `kdcache train` "
                    "checkpoint)"
                )
            )
        model = record.model
    elif record.model is not None and canonical_model_spec(model) != canonical_model_spec(
        record.model
    ):
        raise ConfigError(
            f"{model_option} {model!r} contradicts --weights {weights}, a checkpoint of model "
            f"{record.model!r}; drop {model_option} (the checkpoint's model is used) or pass "
            f"weights of a {model!r}"
        )
    dataset = dataset or record.dataset or default_dataset
    if dataset is None:
        raise ConfigError(
            "no dataset given: pass --dataset SPEC"
            + ("" if weights is None else f" (--weights {weights} records none)")
        )
    return model, dataset


def load_checkpoint(model: nn.Module, weights: str, *, spec: str, dataset: LabeledDataset) -> None:
    """Load ``weights`` into ``model``, built for ``dataset``: weights of another dataset's
    classes or channels are refused naming both datasets and how to choose the right one."""
    record = read_record(weights)
    given = f"dataset {dataset.spec!r} ({dataset.num_classes} classes, {dataset.in_channels} "
    given += "channels)"
    hint = (
        f"pass --dataset {record.dataset} (or omit --dataset)"
        if record.dataset is not None and record.dataset != dataset.spec
        else "pass --dataset SPEC for the dataset the weights were trained on"
    )
    trained = (record.num_classes, record.in_channels)
    if None not in trained and trained != (dataset.num_classes, dataset.in_channels):
        raise CheckpointError(
            f"--weights {weights} holds a model for {record.num_classes} classes and "
            f"{record.in_channels} channels{record.describe()}, but {given} is in use; {hint}"
        )
    try:
        load_weights(model, weights, spec=spec)
    except CheckpointError as error:
        if not record.loads:
            raise
        raise CheckpointError(f"{error}; {given} is in use: {hint}") from None
