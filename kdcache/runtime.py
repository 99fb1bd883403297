"""Small pieces every stage needs: the device, sample indices alongside items, atomic saves."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdcache.choices import AMP_DTYPES
from kdcache.errors import ConfigError, KdcacheError
from kdcache.store.location import refuse_inside_store


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
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
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
    """A loader over ``(input, label, index)`` batches, seeded so runs repeat exactly.

    A ``sampler`` (e.g. a chunked logit feed's order) replaces the seeded shuffle; ``collate_fn``
    replaces the default stacking (e.g. for encoded files of different lengths).
    """
    shuffle = shuffle and sampler is None
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def prepare_output_dir(
    path: str | os.PathLike[str], *, overwrite: bool, marker: str = "last.pt"
) -> Path:
    """Create the run folder, refusing to clobber a finished run unless ``overwrite`` and
    refusing an empty path or one inside a Zarr store."""
    if not os.fspath(path).strip():
        raise ConfigError("the output folder is empty; pass --out FOLDER, e.g. --out runs/student")
    refuse_inside_store(path, "the output folder")
    out = Path(path)
    if (out / marker).exists() and not overwrite:
        raise KdcacheError(
            f"{out} already holds a finished run ({marker}); pass --overwrite to replace it "
            "or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kdcache-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise KdcacheError(
            f"cannot write to output folder {out}: {error.strerror}; choose a writable --out"
        ) from None
    return out


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save so that ``path`` is always either the old file or the complete new one."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)
