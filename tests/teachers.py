"""Deterministic teachers for dump tests, named by spec as ``teachers:FUNCTION``.

Each builds kdcache's ``cnn:8`` from a fixed seed, so separate processes compute identical
logits; the variants misbehave in one controlled way.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from kdcache.models import build_model


def _seeded(num_classes: int, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn:8", num_classes=num_classes, in_channels=in_channels)


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def seeded(*, num_classes: int, in_channels: int) -> nn.Module:
    """cnn:8 with weights from seed 0."""
    return _seeded(num_classes, in_channels)


class _Slow(_Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The pause and the gate let a test stop the dump at a chosen point, then kill it.
        time.sleep(float(os.environ.get("KDCACHE_TEST_BATCH_SLEEP", "0.05")))
        gate = os.environ.get("KDCACHE_TEST_GATE")
        while gate and os.path.exists(gate):
            time.sleep(0.01)
        return self.inner(x)


def slow(*, num_classes: int, in_channels: int) -> nn.Module:
    """``seeded`` that sleeps KDCACHE_TEST_BATCH_SLEEP seconds (default 0.05) per batch, and waits
    before each batch while the file named by KDCACHE_TEST_GATE exists."""
    return _Slow(_seeded(num_classes, in_channels))


class _NaNForBright(_Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        bright = x.flatten(1).mean(dim=1) > float(os.environ["KDCACHE_TEST_BRIGHT"])
        return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)


def nan_for_bright(*, num_classes: int, in_channels: int) -> nn.Module:
    """``seeded`` whose logits are NaN for inputs with mean above KDCACHE_TEST_BRIGHT."""
    return _NaNForBright(_seeded(num_classes, in_channels))


def too_wide(*, num_classes: int, in_channels: int) -> nn.Module:
    """A teacher with one output more than the dataset has classes."""
    return _seeded(num_classes + 1, in_channels)


def fingerprint(image: torch.Tensor) -> str:
    """Names a fake-dataset image by its first pixels (exact values, no arithmetic)."""
    return image.flatten()[:16].numpy().tobytes().hex()


class _Recording(_Wrapped):
    """Appends ``EPOCH FINGERPRINT`` for every training sample to $KDCACHE_TEST_RECORD/rankR."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.epoch = 0
        self._was_training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.epoch += not self._was_training  # fit() switches to eval between epochs
            path = os.path.join(
                os.environ["KDCACHE_TEST_RECORD"], f"rank{os.environ.get('RANK', 0)}"
            )
            with open(path, "a") as stream:
                stream.writelines(f"{self.epoch} {fingerprint(image)}\n" for image in x.cpu())
        self._was_training = self.training
        return self.inner(x)


def recording(*, num_classes: int, in_channels: int) -> nn.Module:
    """An ``mlp:16`` student that records which samples it trains on (see _Recording)."""
    return _Recording(build_model("mlp:16", num_classes=num_classes, in_channels=in_channels))


class _Loud(_Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e6


def loud(*, num_classes: int, in_channels: int) -> nn.Module:
    """``seeded`` with its logits times 1e6: beyond float16's largest value (65504)."""
    return _Loud(_seeded(num_classes, in_channels))


def dropout(*, num_classes: int, in_channels: int) -> nn.Module:
    """A small MLP with batch norm and dropout: a student whose training draws random numbers and
    behaves differently in train and eval modes."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * in_channels, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, num_classes),
    )


def halt_if_chosen(training_passes: int) -> None:
    """At the KDCACHE_TEST_HALT_AT-th forward pass in train mode, create the file
    KDCACHE_TEST_HALTED and stand still forever: a run a test can kill at a chosen step."""
    if training_passes == int(os.environ.get("KDCACHE_TEST_HALT_AT", "0")):
        with open(os.environ["KDCACHE_TEST_HALTED"], "w"):
            pass
        while True:
            time.sleep(1)


class _Halting(_Wrapped):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.training_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.training_passes += 1
            halt_if_chosen(self.training_passes)
        return self.inner(x)


def halting(*, num_classes: int, in_channels: int) -> nn.Module:
    """``dropout`` that halts at a chosen training step (:func:`halt_if_chosen`); without the
    variable, ``dropout`` itself."""
    return _Halting(dropout(num_classes=num_classes, in_channels=in_channels))
