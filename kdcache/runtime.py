"""Where and how models compute: the device, mixed precision, channels-last and torch.compile."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdcache.choices import AMP_DTYPES
from kdcache.errors import ConfigError
from kdcache.wording import counted


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device; ``None`` means cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        # meta, mps, xla...: tensors there cannot be copied to the store or trained here.
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested but CUDA is not available here; use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has "
            f"{counted(torch.cuda.device_count(), 'CUDA device')}, cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes (``amp`` in :data:`AMP_DTYPES`), or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AMP_DTYPES[amp]))


def prepare_model(
    model: nn.Module, *, device: torch.device, channels_last: bool, compile: bool
) -> tuple[nn.Module, nn.Module]:
    """``model`` on ``device`` (channels-last if asked), and the module to call in the hot loop.

    The second is ``torch.compile(model)`` when ``compile``, else ``model`` itself; save and load
    weights through the first, whose parameter names carry no compile prefix.
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Fixed batch shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    step: Callable[..., Any] = torch.compile(model) if compile else model
    return model, step  # type: ignore[return-value]
