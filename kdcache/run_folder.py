"""A run's folder: created without clobbering a finished run, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdcache.errors import ConfigError, KdcacheError
from kdcache.store.format.location import refuse_inside_store
from kdcache.temporaries import TemporaryFile


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
        TemporaryFile.create(
            out / ".kdcache-write-test", purpose="a probe that the folder is writable"
        ).discard()
    except KdcacheError:
        raise
    except OSError as error:
        raise KdcacheError(
            f"cannot write to output folder {out}: {error.strerror}; choose a writable --out"
        ) from None
    return out


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save so that ``path`` is always either the old file or the complete new one."""
    with TemporaryFile.create(
        path.with_name(path.name + ".tmp"), purpose=f"{path.name} being saved"
    ) as temporary:
        torch.save(obj, temporary.stream)
        temporary.publish(path)
