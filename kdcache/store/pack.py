"""Pack a complete store into one zip file that open_store, distill and verify read directly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import ConfigError, StoreExistsError, StoreWriteError
from kdcache.store._zarr_compat import buffer_prototype, run_sync
from kdcache.store.layout import StoreLike
from kdcache.store.location import parse_location, partial_files, zarr_store
from kdcache.store.reader import open_store


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

    Chunks are stored uncompressed in the zip (they are already zstd-compressed), so readers can
    seek straight to them. The zip is written to a temporary name and renamed when complete.
    """
    from zarr.storage import ZipStore

    target = Path(out)
    if target.suffix.lower() != ".zip":
        raise ConfigError(f"pack output must end in .zip, got {os.fspath(out)!r}; e.g. teacher.zip")
    if target.exists() and not overwrite:
        raise StoreExistsError(
            f"{target} already exists; pass --overwrite to replace it or choose another name"
        )
    location = parse_location(source)
    open_store(location)  # refuses missing, foreign, newer-format and unfinished stores
    skipped = {path.relative_to(location.target).as_posix() for path in partial_files(location)}
    temporary = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source_store = zarr_store(location, read_only=True)
        packed = ZipStore(temporary, mode="w")

        async def copy() -> int:
            count = 0
            async for key in source_store.list():
                if key in skipped:
                    continue
                value = await source_store.get(key, prototype=buffer_prototype())
                if value is not None:
                    await packed.set(key, value)
                    count += 1
            return count

        count = run_sync(copy())
        packed.close()
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StoreWriteError(
            f"cannot write {target}: {error.strerror or error}; choose a writable path "
            "with free space"
        ) from None
    open_store(target)  # the zip must open as a store before we call it done
    return PackResult(out=os.fspath(target), num_objects=count, nbytes=target.stat().st_size)
