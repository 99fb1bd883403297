"""Typed run configurations. Each is validated on construction and saved as JSON next to outputs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.datasets import SPLITS
from kdcache.errors import ConfigError
from kdcache.logits.encodings import parse_encoding
from kdcache.logits.losses import LOSS_NAMES
from kdcache.store.feed import parse_size


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_split(split: str | None) -> None:
    _require(
        split is None or split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {split!r}"
    )


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Options shared by every training run."""

    out: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(
            math.isfinite(self.lr) and self.lr > 0, f"learning rate must be > 0, got {self.lr}"
        )
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def save(self, path: Path, **resolved: Any) -> None:
        """Write the configuration plus values resolved at run time (device, dataset, ...)."""
        path.write_text(json.dumps({**self.to_dict(), "resolved": resolved}, indent=2) + "\n")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Plain cross-entropy training of ``model`` on ``dataset``."""

    model: str
    dataset: str = "digits"
    split: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_split(self.split)


@dataclass(frozen=True, kw_only=True)
class DistillConfig(LoopConfig):
    """Distillation of ``student`` from a cached store, or from a live teacher when ``cache`` is None.

    With a cache, ``dataset`` and ``split`` default to those recorded in the store, and
    ``cache_memory`` (bytes or e.g. ``"8GiB"``; default half the available memory) bounds the
    decoded logits held in RAM (see :mod:`kdcache.store.feed`).
    """

    student: str
    cache: str | None = None
    teacher: str | None = None
    weights: str | None = None
    dataset: str | None = None
    split: str | None = None
    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.7
    gamma: float = 2.0
    top_k: int = 5
    cache_memory: int | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_split(self.split)
        if self.cache_memory is not None:
            parse_size(self.cache_memory)  # raises ConfigError for an unreadable size
        _require(
            self.loss in LOSS_NAMES,
            f"unknown loss {self.loss!r}; valid losses: {', '.join(LOSS_NAMES)}",
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature}",
        )
        _require(0.0 <= self.alpha <= 1.0, f"alpha must lie in [0, 1], got {self.alpha}")
        _require(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
        _require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        if self.cache is None:
            _require(
                self.teacher is not None and self.dataset is not None,
                "distill needs --cache STORE, or --teacher SPEC and --dataset SPEC for online distillation",
            )
            _require(
                self.cache_memory is None,
                "--cache-memory only applies with --cache STORE; drop it for online distillation",
            )
        else:
            _require(
                self.teacher is None and self.weights is None,
                "--teacher/--weights make no sense with --cache: the cache replaces the teacher; drop one",
            )


@dataclass(frozen=True, kw_only=True)
class DumpConfig:
    """Run ``teacher`` once over ``dataset``/``split`` and store its raw logits at ``out``."""

    teacher: str
    dataset: str = "digits"
    out: str = "teacher.zarr"
    weights: str | None = None
    split: str = "train"
    encoding: str = "float16"
    batch_size: int = 256
    num_workers: int = 0
    device: str | None = None
    chunk_rows: int | None = None
    overwrite: bool = False
    resume: bool = False
    #: fsync each chunk of a local store before marking it written (kdcache.store.durability).
    fsync: bool = True

    def __post_init__(self) -> None:
        check_split(self.split)
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _require(
            self.chunk_rows is None or self.chunk_rows >= 1,
            f"chunk_rows must be >= 1, got {self.chunk_rows}",
        )
        _require(
            not (self.overwrite and self.resume),
            "--overwrite and --resume exclude each other; pick one",
        )
        parse_encoding(self.encoding)  # a bad name fails here, listing the valid encodings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
