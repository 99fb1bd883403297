"""Pack a complete store into one zip file that open_store, distill and verify read directly."""

from __future__ import annotations

import os
import stat
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kdcache.errors import (
    ConfigError,
    KdcacheError,
    StoreExistsError,
    StoreFormatError,
    StoreWriteError,
)
from kdcache.store.format._zarr_compat import buffer_prototype, run_sync
from kdcache.store.format.digests import DIGESTS_ARRAY
from kdcache.store.format.layout import (
    FIRST_TOKEN_ARRAY,
    LABELS_ARRAY,
    OFFSETS_ARRAY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    StoreLike,
    own_keys,
)
from kdcache.store.format.location import parse_location, refuse_inside_store, zarr_store
from kdcache.store.read.reader import JoinedReader, open_store
from kdcache.temporaries import TemporaryFile

__all__ = [
    "PackResult",
    "pack_store",
]


@dataclass(frozen=True)
class PackResult:
    """Where the zip went, how many objects and bytes it holds."""

    out: str
    num_objects: int
    nbytes: int


def pack_store(
    source: StoreLike, out: str | os.PathLike[str], *, overwrite: bool = False
) -> PackResult:
    """Copy the complete store at ``source`` (folder or URL) into the zip file ``out``.

    Only the store's own objects are copied: its metadata and the chunks of the arrays it
    knows. Anything else in the folder (run folders, checkpoints, notes) is left out, and a
    symbolic link anywhere on a key's path is refused, so that a link to a private file never
    ends up in the zip. Chunks are stored uncompressed in the zip (they are already
    zstd-compressed), so readers can seek straight to them. The zip is written to a temporary
    name (``OUT.partial``, created exclusively: kdcache.temporaries) and renamed when complete.
    """
    target = Path(out)
    if target.suffix.lower() != ".zip":
        raise ConfigError(f"pack output must end in .zip, got {os.fspath(out)!r}; e.g. teacher.zip")
    if target.exists() and not overwrite:
        raise StoreExistsError(
            f"{target} already exists; pass --overwrite to replace it or choose another name"
        )
    refuse_inside_store(target, "the pack output")
    location = parse_location(source)
    reader = open_store(location)  # refuses missing, foreign, newer-format, damaged, unfinished
    if isinstance(reader, JoinedReader):
        raise ConfigError(
            f"{location.text} is a joined store, which reads its parts in place and holds no rows "
            "to pack; pack a copy (`kdcache concat PARTS --out STORE` without --link)"
        )
    # Every array the store pinned at creation (any kind, any future array) and the written flags
    # (created last, unpinned); older stores, which pinned none, by the names their releases
    # wrote (own_keys skips arrays a store lacks).
    pinned = list(reader.metadata.arrays or {})
    names = (
        [*pinned, WRITTEN_ARRAY]
        if pinned
        else [
            *reader.encoding.layout(reader.num_classes),
            LABELS_ARRAY,
            VIEW_PARAMS_ARRAY,
            WRITTEN_ARRAY,
            DIGESTS_ARRAY,
            OFFSETS_ARRAY,
            FIRST_TOKEN_ARRAY,
        ]
    )
    keys = own_keys(reader.group, names)
    if location.folder is not None:
        keys = [key for key in keys if _regular_file(location.folder, key, location.text)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with TemporaryFile.create(
            target.with_name(target.name + ".partial"), purpose=f"the zip being packed for {target}"
        ) as temporary:
            count = _write_zip(zarr_store(location, read_only=True), keys, temporary.stream)
            temporary.publish(target)
    except KdcacheError:
        raise
    except OSError as error:
        raise StoreWriteError(
            f"cannot write {target}: {error.strerror or error}; choose a writable path "
            "with free space"
        ) from None
    open_store(target)  # the zip must open as a store before we call it done
    return PackResult(out=os.fspath(target), num_objects=count, nbytes=target.stat().st_size)


def _write_zip(source: Any, keys: list[str], stream: BinaryIO) -> int:
    """Copy ``keys`` of the zarr store ``source`` into a zip written to ``stream``, as zarr's
    ``ZipStore`` lays them out (stored uncompressed); returns how many objects it holds."""

    async def copy(packed: zipfile.ZipFile) -> int:
        count = 0
        for key in keys:
            value = await source.get(key, prototype=buffer_prototype())
            if value is not None:  # chunks never written (fill values) are absent
                member = zipfile.ZipInfo(key, date_time=time.localtime()[:6])
                member.compress_type = zipfile.ZIP_STORED
                member.external_attr = 0o644 << 16
                packed.writestr(member, value.to_bytes())
                count += 1
        return count

    with zipfile.ZipFile(stream, mode="w", compression=zipfile.ZIP_STORED) as packed:
        return run_sync(copy(packed))


def _regular_file(root: Path, key: str, where: str) -> bool:
    """Whether ``key`` is a regular file of the store at ``root``; refuses links on its path."""
    path = root
    for part in key.split("/"):
        path = path / part
        try:
            status = path.lstat()
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(status.st_mode):
            raise StoreFormatError(
                f"{where} holds a symbolic link at {path}; pack copies only the store's own "
                "files: replace the link by the file it points to (or dump again) and pack again"
            )
    if not stat.S_ISREG(status.st_mode):
        raise StoreFormatError(
            f"{where}: {path} is not a regular file; pack copies only the store's own files"
        )
    return True
