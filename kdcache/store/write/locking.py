"""One writer per store: an OS lock file beside a local store, a renewed lease beside a remote one.

Local stores (``teacher.zarr``) are guarded by ``teacher.zarr.lock`` held with ``flock``: the
kernel drops the lock when its process dies, so a SIGKILLed or crashed writer never leaves the
store stuck. Works on local disks and on NFS (Linux maps ``flock`` to NFS byte-range locks).

Object stores have no such locks, so a remote store ``s3://b/teacher.zarr`` gets a lease object
``s3://b/teacher.zarr.lock`` created with create-if-absent (S3 conditional writes), naming its
holder and an expiry that the writer renews while it writes. A crashed writer's lease blocks
others until it expires (:data:`_LEASE_SECONDS`); delete the lease object to take over sooner.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import stat
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kdcache.errors import StoreLockedError, StoreWriteError
from kdcache.store.format.location import RemoteLocation, StoreLocation

__all__ = [
    "WriterLock",
    "acquire_writer_lock",
]

_LOCK_SUFFIX = ".lock"
#: How long a remote writer's lease lasts without renewal.
_LEASE_SECONDS = 600.0


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _holder(**extra: Any) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": _now().isoformat(timespec="seconds"),
        **extra,
    }


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


class WriterLock(ABC):
    """The right to write one store; :meth:`release` gives it up (idempotent)."""

    def refresh(self) -> None:  # noqa: B027 - most locks need no renewal: a no-op by default
        """Keep the lock alive during a long write (renews remote leases)."""

    @abstractmethod
    def release(self) -> None:
        """Give up the lock."""


class _FileLock(WriterLock):
    """An ``flock`` on ``STORE.lock``, released by the OS if the process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        # A writer dropped without release() must not keep the lock until interpreter exit.
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(cls, path: Path, where: str) -> _FileLock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreWriteError(
                f"cannot write a store at {where}: {error.strerror} ({error.filename}); "
                "choose a writable path"
            ) from None
        while True:
            fd = _open_lock_file(path, where)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{where} is being written by another writer ({_describe_holder(holder)}, lock "
                    f"{path}); wait for it to finish or stop it: the lock is freed the moment it "
                    "exits"
                ) from None
            # A finishing writer unlinks the file before unlocking it: if we locked an unlinked
            # file, another writer may hold the new one, so start over on the path's current file.
            try:
                current = os.lstat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                _refuse_foreign(fd, path, where)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder()).encode(), 0)
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        if self._closer.alive:
            self.path.unlink(missing_ok=True)
            self._closer()


#: Never follow a link planted at the lock's path, never block on a FIFO planted there.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: The keys of the record a kdcache writer leaves in its lock file.
_HOLDER_KEYS = {"host", "pid", "since"}


def _open_lock_file(path: Path, where: str) -> int:
    """A descriptor of the lock file at ``path``: created afresh, or an existing regular file."""
    for flags in (_OPEN_FLAGS | os.O_CREAT | os.O_EXCL, _OPEN_FLAGS):
        try:
            return os.open(path, flags, 0o644)
        except FileExistsError:
            continue  # left by an earlier writer: open it without creating, checked below
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                return _open_lock_file(path, where)  # removed between the two opens: create it
            raise StoreWriteError(
                f"cannot write a store at {where}: cannot create its lock file {path}; "
                "choose a writable path"
            ) from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StoreWriteError(
                    f"the lock file {path} of {where} is a symbolic link; kdcache never writes "
                    "through links: remove the link (it is not kdcache's) and run again"
                ) from None
            raise StoreWriteError(
                f"cannot write a store at {where}: {error.strerror} opening its lock file {path}; "
                "choose a writable path"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse_foreign(fd: int, path: Path, where: str) -> None:
    """Refuse a lock path that holds anything but a lock file a kdcache writer left there."""
    status = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(status.st_mode):
        problem = "is not a regular file"
    elif status.st_nlink != 1:
        problem = f"has {status.st_nlink} hard links (a lock file has one)"
    elif status.st_uid != os.geteuid():
        problem = f"belongs to user id {status.st_uid}, not to you"
    elif status.st_size:
        record = _read_json(fd)
        if not isinstance(record, dict) or not record.keys() >= _HOLDER_KEYS:
            problem = "holds something other than a kdcache lock record"
    if problem is not None:
        os.close(fd)
        raise StoreWriteError(
            f"{path}, where {where} keeps its writer lock, {problem}; kdcache leaves it untouched: "
            "move it away (or choose another store path) and run again"
        )


def _read_json(fd: int) -> dict[str, Any] | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


class _LeaseLock(WriterLock):
    """A lease object ``STORE.lock`` in an object store, renewed while the writer runs.

    Create-if-absent makes two fresh writers exclusive. Taking over an expired lease is a delete
    then create, so two writers racing for the same expired lease could both win; each checks
    that it still owns the lease whenever it renews, and stops if not.
    """

    def __init__(self, fs: Any, path: str, where: str, lease_seconds: float) -> None:
        self._fs, self._path, self._where = fs, path, where
        self._lease_seconds = lease_seconds
        self._owner = uuid.uuid4().hex
        self._renewed = 0.0
        self._held = False

    @classmethod
    def acquire(cls, url: str, where: str, *, lease_seconds: float = _LEASE_SECONDS) -> _LeaseLock:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(url)
        lock = cls(fs, path, where, lease_seconds)
        current = lock._read()
        if current is not None:
            if _dt.datetime.fromisoformat(current["expires_at"]) > _now():
                raise lock._locked_error(current)
            fs.rm(path)  # expired: its writer crashed or lost its connection
        try:
            lock._write(exclusive=True)
        except FileExistsError:
            raise lock._locked_error(lock._read()) from None
        lock._held = True
        return lock

    def _locked_error(self, lease: dict[str, Any] | None) -> StoreLockedError:
        until = (lease or {}).get("expires_at", "unknown")
        return StoreLockedError(
            f"{self._where} is being written by another writer ({_describe_holder(lease)}, lease "
            f"until {until}); wait for it to finish, or if that writer is dead, wait for the lease "
            f"to expire or delete {self._fs.unstrip_protocol(self._path)}"
        )

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self._fs.cat_file(self._path))
        except FileNotFoundError:
            return None
        except ValueError:
            lease = None
        if not isinstance(lease, dict) or "expires_at" not in lease:
            # Unreadable leases count as expired rather than blocking every writer forever.
            return {"expires_at": _dt.datetime.min.replace(tzinfo=_dt.UTC).isoformat()}
        return lease

    def _write(self, *, exclusive: bool) -> None:
        expires = _now() + _dt.timedelta(seconds=self._lease_seconds)
        lease = _holder(owner=self._owner, expires_at=expires.isoformat(timespec="seconds"))
        with self._fs.open(self._path, "xb" if exclusive else "wb") as stream:
            stream.write(json.dumps(lease).encode())
        self._fs.invalidate_cache(self._path)
        self._renewed = time.monotonic()

    def refresh(self) -> None:
        if not self._held or time.monotonic() - self._renewed < self._lease_seconds / 3:
            return
        current = self._read()
        if current is None or current.get("owner") != self._owner:
            self._held = False
            raise StoreLockedError(
                f"lost the write lease on {self._where} to another writer "
                f"({_describe_holder(current)}); "
                "stop the other writer, then rerun with --resume"
            )
        self._write(exclusive=False)

    def release(self) -> None:
        if self._held:
            self._held = False
            current = self._read()
            if current is not None and current.get("owner") == self._owner:
                self._fs.rm(self._path)


def acquire_writer_lock(
    location: StoreLocation, *, lease_seconds: float = _LEASE_SECONDS
) -> WriterLock:
    """Take the single-writer lock of the store at ``location`` or raise
    :class:`StoreLockedError`."""
    if isinstance(location, RemoteLocation):
        return _LeaseLock.acquire(
            location.target.rstrip("/") + _LOCK_SUFFIX, location.text, lease_seconds=lease_seconds
        )
    # Keyed by the resolved path: an alias link or ``store.zarr/.`` shares the store's one lock.
    return _FileLock.acquire(Path(location.resolved().target + _LOCK_SUFFIX), location.text)
