"""``--overwrite`` without a moment of having no store: build beside, swap in when complete.

A replacing dump writes into ``STORE.incoming`` next to the old store, under the old store's
writer lock, and only :meth:`kdcache.store.write.writer.StoreWriter.finalize` swaps it in, once
the replacement is complete and verifies: one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux (two
renames elsewhere), then the old store is deleted. Until then the old store is untouched and
readable, so a teacher that fails (NaN logits, a full disk, Ctrl-C) leaves it as it was;
``--resume`` continues the interrupted replacement. ``STORE.incoming`` is a folder the writer
creates itself (kdcache.temporaries): a link there is refused, never followed, and only an
unfinished replacement holding nothing but its own files is taken for a leftover of ours.

The old store is deleted only when it holds nothing but its own arrays and metadata: a folder or
file someone put inside it makes ``--overwrite`` refuse rather than destroy it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from kdcache.errors import StoreExistsError, StoreWriteError
from kdcache.store.format.location import LocalLocation, StoreLocation, partial_files

__all__ = [
    "refuse_foreign_entries",
    "remove_store_folder",
    "staging_location",
    "swap_in",
]

_STAGING_SUFFIX = ".incoming"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_location(location: StoreLocation) -> StoreLocation:
    """Where a replacement of the (resolved, local) store at ``location`` is built."""
    return location.with_suffix(_STAGING_SUFFIX)


def _foreign_entries(root: Path, own_keys: set[str]) -> list[str]:
    """Entries under ``root`` that are not among the store's own keys: links anywhere, and files
    that are neither its arrays and metadata nor a killed writer's temporary files."""
    temporary = {path.relative_to(root).as_posix() for path in _partial_files_in(root)}
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        for name in [*subfolders, *files]:
            path = here / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink() or (name in files and key not in own_keys | temporary):
                found.append(key)
    return sorted(found)


def _partial_files_in(root: Path) -> list[Path]:
    return partial_files(LocalLocation(str(root), str(root)))


def refuse_foreign_entries(root: Path, own_keys: set[str], where: str) -> None:
    """Refuse to replace a store that holds files kdcache did not write there."""
    foreign = _foreign_entries(root, own_keys)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise StoreExistsError(
            f"{where} holds entries that are not part of the store ({shown}); --overwrite would "
            "delete them: move them out of the store (or choose another path) and run again"
        )


def remove_store_folder(root: Path) -> None:
    """Delete a store folder kdcache owns (links inside are removed, never followed)."""
    shutil.rmtree(root, ignore_errors=False)


def swap_in(staging: Path, target: Path, where: str) -> None:
    """Put the complete store at ``staging`` in place of the one at ``target``, then delete the
    old one. After an exchange the old store is briefly at ``staging``; a crash then leaves it
    there, complete, and the next ``--overwrite`` removes it."""
    try:
        if not _exchange(staging, target):
            aside = target.with_name(target.name + ".replaced")
            if os.path.lexists(aside):  # rename would replace an empty folder there silently
                raise FileExistsError(errno.EEXIST, f"{aside} is in the way")
            os.rename(target, aside)
            os.rename(staging, target)
            staging = aside
        remove_store_folder(staging)
    except OSError as error:
        raise StoreWriteError(
            f"the new store for {where} is complete at {staging} but could not replace the old "
            f"one ({error.strerror or error}); move it into place by hand"
        ) from None


def _exchange(first: Path, second: Path) -> bool:
    """Atomically exchange two paths with Linux's renameat2; False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    return result == 0
