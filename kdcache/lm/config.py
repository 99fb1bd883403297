"""The typed configuration of a language-model distillation (training and dumping reuse
:class:`~kdcache.config.TrainConfig` and :class:`~kdcache.config.DumpConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from kdcache.config import DistillConfig, LoopConfig, check_split
from kdcache.errors import ConfigError
from kdcache.logits.loss_options import DIVERGENCES
from kdcache.store.read.feed import parse_size

#: Options of the image distillation that mean nothing here; refused unless at their defaults.
_IMAGE_ONLY = (
    "weights",
    "gamma",
    "top_k",
    "indices",
    "exclude_classes",
    "augment",
    "augment_seed",
    "views",
    "student_augment",
)


@dataclass(frozen=True, kw_only=True)
class LMDistillConfig(LoopConfig):
    """Distill causal-LM ``student`` from a sequence store, or from a live ``teacher`` (online).

    ``loss`` is the token-level divergence (:data:`~kdcache.logits.sequence_losses.DIVERGENCES`);
    ``skew`` is the mixing weight of ``loss="skew"``. With a cache, ``dataset`` and ``split``
    default to those recorded in the store.
    """

    student: str
    cache: str | None = None
    teacher: str | None = None
    dataset: str | None = None
    split: str | None = None
    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.7
    skew: float = 0.1
    cache_memory: int | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_split(self.split)
        if self.loss not in DIVERGENCES:
            raise ConfigError(
                f"unknown loss {self.loss!r} for a language model; valid losses: "
                f"{', '.join(DIVERGENCES)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 < self.skew < 1.0:
            raise ConfigError(f"skew must lie in (0, 1), got {self.skew}")
        if self.cache_memory is not None:
            parse_size(self.cache_memory)
        if self.cache is None and (self.teacher is None or self.dataset is None):
            raise ConfigError(
                "distill needs --cache STORE, or --teacher SPEC and --dataset text:FILE for "
                "online distillation"
            )
        if self.cache is not None and self.teacher is not None:
            raise ConfigError(
                "--teacher makes no sense with --cache: the cache replaces the teacher; drop one"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LMDistillConfig:
        """From the ``distill`` command's options, refusing the image-only ones when set."""
        defaults = {f.name: f.default for f in fields(DistillConfig)}
        for name in _IMAGE_ONLY:
            if name in options and options[name] != defaults.get(name):
                raise ConfigError(
                    f"--{name.replace('_', '-')} applies to image models only; drop it for a "
                    "language model (hf:PATH folders hold their own weights)"
                )
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in options.items() if key in known})
