"""Temporary files and folders beside an output, which nobody can plant in advance.

kdcache writes outputs atomically: first under a temporary name beside them (``OUT.zip.partial``,
``best.pt.tmp``, ``STORE.incoming``), then renamed into place. Those names are predictable, so
what is already there is not trusted: a temporary is created exclusively (``O_CREAT | O_EXCL``,
``mkdir``), never through a symbolic link (``O_NOFOLLOW``, ``lstat``), and a temporary file is
held with ``flock`` while it is written. A leftover temporary file is removed only when it is
recognisably a killed run's: a regular file of this user with one link that no live process
holds locked. A link, a folder, another user's file or a file being written is refused in one
line that says how to fix it; nothing is written through it or deleted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from kdcache.errors import PathInTheWayError

#: Never follow a link planted at the path, never block on a FIFO planted there.
_NO_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Attempts at creating a temporary file whose name another process keeps taking.
_CREATE_ATTEMPTS = 3


class TemporaryFile:
    """A new file at ``path`` that this process created and holds locked until it is published
    (renamed over its target) or discarded (deleted); a ``with`` block discards it unless it was
    published."""

    def __init__(self, path: Path, stream: BinaryIO) -> None:
        self.path = path
        #: The open file, for writing (binary, seekable).
        self.stream = stream

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, purpose: str) -> TemporaryFile:
        """Create ``path`` exclusively for ``purpose`` (named in errors), after removing a killed
        run's leftover there; other ``OSError`` (a read-only folder, a full disk) propagate."""
        path = Path(path)
        for _ in range(_CREATE_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o666)
            except FileExistsError:
                _remove_leftover_file(path, purpose)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(path, purpose) from None
            return cls(path, os.fdopen(fd, "w+b"))
        raise PathInTheWayError(
            f"{path}, where kdcache puts {purpose}, is recreated by another process each time "
            "kdcache removes it; stop that process and run again"
        )

    def publish(self, target: str | os.PathLike[str]) -> None:
        """Rename the complete file over ``target`` (a link there is replaced, not followed)."""
        self.stream.flush()
        if not self._still_here():
            self.stream.close()
            raise PathInTheWayError(
                f"{self.path} was replaced by another process while kdcache wrote {target} "
                "through it; nothing was published: run again"
            )
        os.replace(self.path, target)
        self.stream.close()

    def discard(self) -> None:
        """Delete the file if it is still ours (idempotent)."""
        if self.stream.closed:
            return
        if self._still_here():
            self.path.unlink()
        self.stream.close()

    def _still_here(self) -> bool:
        """Whether ``path`` still names the file this process created and writes."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.stream.fileno())
        return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> TemporaryFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()


def create_folder(path: str | os.PathLike[str], *, purpose: str) -> None:
    """Create the folder ``path`` for ``purpose``, refusing anything already there."""
    try:
        os.mkdir(path)
    except FileExistsError:
        raise _in_the_way(Path(path), purpose, _describe(os.lstat(path))) from None


def own_folder_exists(path: str | os.PathLike[str], *, purpose: str) -> bool:
    """Whether a real folder of this user is at ``path``, which may be a leftover of ours; False
    when nothing is there. Refuses a link, a file or another user's folder."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
        raise _in_the_way(Path(path), purpose, _describe(status))
    return True


def _remove_leftover_file(path: Path, purpose: str) -> None:
    """Delete a killed run's temporary file at ``path``; refuse anything else there."""
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
    except FileNotFoundError:
        return  # removed meanwhile: the caller creates it afresh
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _in_the_way(path, purpose, "a symbolic link") from None
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
            raise _in_the_way(path, purpose, _describe(status))
        if status.st_nlink != 1:
            raise _in_the_way(path, purpose, f"a file with {status.st_nlink} hard links")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(path, purpose) from None
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (status.st_dev, status.st_ino):
            path.unlink()
    finally:
        os.close(fd)


def _describe(status: os.stat_result) -> str:
    if status.st_uid != os.geteuid():
        return f"owned by user id {status.st_uid}, not by you"
    if stat.S_ISLNK(status.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(status.st_mode):
        return "a folder"
    if stat.S_ISREG(status.st_mode):
        return "a file"
    return "a special file (FIFO, socket or device)"


def _in_the_way(path: Path, purpose: str, found: str) -> PathInTheWayError:
    return PathInTheWayError(
        f"{path}, where kdcache puts {purpose}, is {found}; kdcache never writes through or "
        "deletes what it did not create: move it away (or remove it) and run again"
    )


def _busy(path: Path, purpose: str) -> PathInTheWayError:
    return PathInTheWayError(
        f"{path}, where kdcache puts {purpose}, is being written by another running process; "
        "wait for it to finish (or stop it) and run again"
    )
