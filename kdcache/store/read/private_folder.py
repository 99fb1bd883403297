"""This user's private folder for shared tables, and files in it that nobody else can plant.

Shared tables live in ``kdcache-UID`` inside the shared root (``$KDCACHE_SHARED_DIR``, else
``/dev/shm``, else the temporary folder). Anyone can compute that name, so it is trusted only
after :func:`open_private_folder` has opened it without following links and checked, on the open
descriptor, that it is a folder owned by this user with mode 0700. Something else there (another
user's folder, a link, a file, a folder others can write) is left alone: this process makes a
fresh private folder with an unguessable name instead, and puts its path in
``$KDCACHE_SHARED_TABLES``, where the processes it starts (``sweep --jobs`` workers) and the
ranks that adopt it (:func:`adopt_private_folder`) find it.

Every file inside is reached through the folder's descriptor, created with ``O_EXCL`` and mode
0600, opened with ``O_NOFOLLOW`` and checked with ``fstat`` (:func:`open_owned_file`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdcache.errors import ConfigError

__all__ = [
    "PRIVATE_ENV",
    "SHARED_DIR_ENV",
    "NotOwnedError",
    "adopt_private_folder",
    "create_owned_file",
    "open_owned_file",
    "open_private_folder",
    "other_private_folders",
    "private_folder",
]

SHARED_DIR_ENV = "KDCACHE_SHARED_DIR"
PRIVATE_ENV = "KDCACHE_SHARED_TABLES"
_FOLDER_MODE = 0o700
_FILE_MODE = 0o600

log = logging.getLogger("kdcache")


class NotOwnedError(Exception):
    """An entry is not what this process would have made (why, in one phrase)."""


def _shared_root() -> Path:
    """Where private folders are made: ``$KDCACHE_SHARED_DIR``, ``/dev/shm``, else a temp folder."""
    chosen = os.environ.get(SHARED_DIR_ENV)
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def open_private_folder() -> tuple[int, Path]:
    """A descriptor of this user's private folder (owned, 0700, not a link) and its path."""
    chosen = os.environ.get(PRIVATE_ENV)
    if chosen:
        try:
            return _open_owned_folder(None, chosen), Path(chosen)
        except NotOwnedError as why:
            raise ConfigError(
                f"{PRIVATE_ENV}={chosen} is not a private folder of this user ({why}); unset "
                f"{PRIVATE_ENV} to let kdcache make one"
            ) from None
    root = _shared_root()
    folder = root / f"kdcache-{os.geteuid()}"
    made = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, _FOLDER_MODE)
            made = True
    except OSError as error:
        raise _unusable(root, error) from None
    try:
        return _open_owned_folder(None, folder, fix_mode=made), folder
    except NotOwnedError as why:
        planted = why
    try:
        fresh = Path(tempfile.mkdtemp(prefix=f"kdcache-{os.geteuid()}-", dir=root))
    except OSError as error:
        raise _unusable(root, error) from None
    descriptor = _open_owned_folder(None, fresh, fix_mode=True)
    log.warning(
        "%s is not this user's private folder (%s); shared tables go to %s instead",
        folder,
        planted,
        fresh,
    )
    os.environ[PRIVATE_ENV] = str(fresh)  # the workers this process starts share it
    atexit.register(_remove_if_empty, fresh)
    return descriptor, fresh


def other_private_folders(current: Path) -> Iterator[tuple[int, Path]]:
    """Descriptors of this user's other private folders in the shared root (the ones made in
    place of a planted folder by earlier processes), each closed when the next is asked for."""
    root = _shared_root()
    prefix = f"kdcache-{os.geteuid()}"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return
    for entry in entries:
        if not (entry == prefix or entry.startswith(prefix + "-")) or root / entry == current:
            continue
        try:
            descriptor = _open_owned_folder(None, root / entry)
        except NotOwnedError:
            continue
        try:
            yield descriptor, root / entry
        finally:
            os.close(descriptor)


def _unusable(root: Path, error: OSError) -> ConfigError:
    return ConfigError(
        f"cannot use {root} for shared logit tables: {error.strerror}; set {SHARED_DIR_ENV} "
        "to a writable folder on a local (ideally in-memory) filesystem"
    )


def private_folder() -> Path:
    """The path of this user's private folder (made now if need be), to hand to other processes."""
    descriptor, folder = open_private_folder()
    os.close(descriptor)
    return folder


def adopt_private_folder(folder: str) -> None:
    """Use ``folder`` (another process's :func:`private_folder`) for this process's tables."""
    os.environ[PRIVATE_ENV] = folder


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _describe(path: str | Path, dir_fd: int | None) -> str:
    try:
        found = os.lstat(path, dir_fd=dir_fd)
    except OSError as error:
        return error.strerror or "cannot be read"
    if stat.S_ISLNK(found.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(found.st_mode):
        return "a folder"
    if stat.S_ISREG(found.st_mode):
        return "a file"
    return "neither a file nor a folder"


def _check_owned(descriptor: int, kind: str, mode: int, test: int, *, fix_mode: bool) -> None:
    found = os.fstat(descriptor)
    if stat.S_IFMT(found.st_mode) != test:
        raise NotOwnedError(f"not a {kind}")
    if found.st_uid != os.geteuid():
        raise NotOwnedError(f"owned by uid {found.st_uid}, not {os.geteuid()}")
    if fix_mode:  # made by this process a moment ago: only the umask may have narrowed it
        os.fchmod(descriptor, mode)
        found = os.fstat(descriptor)
    if stat.S_IMODE(found.st_mode) != mode:
        raise NotOwnedError(f"mode {stat.S_IMODE(found.st_mode):04o}, not {mode:04o}")


def _open_owned_folder(dir_fd: int | None, path: str | Path, *, fix_mode: bool = False) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotOwnedError(_describe(path, dir_fd)) from None
        raise NotOwnedError(error.strerror or "cannot be opened") from None
    try:
        _check_owned(descriptor, "folder", _FOLDER_MODE, stat.S_IFDIR, fix_mode=fix_mode)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def open_owned_file(folder: int, name: str, flags: int, *, create: bool) -> int:
    """Open ``name`` in ``folder`` (a descriptor) as a regular file of this user with mode 0600.

    ``create`` makes it with ``O_EXCL`` if absent (a file that appears meanwhile is opened). A
    link, anything not owned by this user with mode 0600 or that cannot be opened raises
    :class:`NotOwnedError`; a missing file (``create=False``) raises ``FileNotFoundError``.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    descriptor = None
    if create:
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(name, flags | os.O_CREAT | os.O_EXCL, _FILE_MODE, dir_fd=folder)
    made = descriptor is not None
    if descriptor is None:
        try:
            descriptor = os.open(name, flags, dir_fd=folder)
        except FileNotFoundError:
            raise
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise NotOwnedError(_describe(name, folder)) from None
            raise NotOwnedError(error.strerror or "cannot be opened") from None
    try:
        _check_owned(descriptor, "regular file", _FILE_MODE, stat.S_IFREG, fix_mode=made)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def create_owned_file(folder: int, name: str) -> int:
    """A new file ``name`` in ``folder``, read-write, mode 0600; refuses anything already there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(name, flags, _FILE_MODE, dir_fd=folder)
    os.fchmod(descriptor, _FILE_MODE)
    return descriptor
