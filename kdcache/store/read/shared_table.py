"""One decoded table per node: processes that read the same store share one copy of its logits.

The in-memory feed decodes a whole store into RAM. K ranks of a torchrun job on one machine, or
the J runs of ``kdcache sweep --jobs J``, would each hold their own copy; instead the first
process to arrive decodes the store into memory-mapped ``.npy`` files in a per-node folder
(``/dev/shm`` when it exists, else the temporary folder; ``KDCACHE_SHARED_DIR`` chooses another)
and every process maps those files read-only: the node holds one table plus K interpreters.

Coordination uses ``flock`` only, which the kernel drops when a process dies:

* ``build.lock`` (exclusive) is held while a table is built, checked or removed, so exactly one
  process decodes and nobody maps a half-built table; ``ready`` is written last;
* ``users`` is held shared by every process that maps the table. When a process lets go and
  can take it exclusively, nobody else maps the table, and it deletes the table's files.

A job killed with SIGKILL leaves its table behind: the next job on the same store reuses it (the
folder is named by the store's location, metadata and last write) and removes it when done; or
delete ``kdcache-*`` folders in the shared folder by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError
from kdcache.store.format.metadata import StoreMetadata

SHARED_DIR_ENV = "KDCACHE_SHARED_DIR"
READY = "ready"


def shared_dir() -> Path:
    """Where shared tables live: ``$KDCACHE_SHARED_DIR``, else ``/dev/shm``, else a temp folder."""
    chosen = os.environ.get(SHARED_DIR_ENV)
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def table_name(where: str, metadata: StoreMetadata) -> str:
    """A folder name that only the same store maps to: its location, metadata and, for a local
    store, when its ``zarr.json`` was last written (a store replaced in place gets a new table)."""
    location = where if "://" in where else os.path.abspath(where)
    record = Path(location) / "zarr.json"
    written = record.stat().st_mtime_ns if record.is_file() else None
    identity = json.dumps([location, written, metadata.to_dict()], sort_keys=True, default=str)
    return "kdcache-" + hashlib.sha256(identity.encode()).hexdigest()[:20]


def _lock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, mode)
    return fd


class SharedTable:
    """The arrays of one decoded store, mapped read-only from the node's shared folder.

    Build or attach with :meth:`open`; :meth:`close` (also run when the object is collected or
    the interpreter exits) unmaps, and removes the files when this was the last user.
    """

    def __init__(self, folder: Path, arrays: dict[str, np.ndarray], users: int) -> None:
        self.folder = folder
        self.arrays = arrays
        self._closer = weakref.finalize(self, SharedTable._release, folder, users)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    @classmethod
    def open(
        cls,
        name: str,
        layout: dict[str, tuple[tuple[int, ...], np.dtype]],
        num_rows: int,
        fill: Callable[[dict[str, np.ndarray]], None],
    ) -> SharedTable:
        """Map table ``name``, first building it with ``fill(writable arrays)`` if no one has.

        ``layout`` maps each array name to its per-row shape and dtype.
        """
        folder = shared_dir() / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            build = _lock(folder / "build.lock", fcntl.LOCK_EX)
        except OSError as error:
            raise ConfigError(
                f"cannot use {folder} for the shared logit table: {error.strerror}; set "
                f"{SHARED_DIR_ENV} to a writable folder on a local (ideally in-memory) filesystem"
            ) from None
        try:
            users = _lock(folder / "users", fcntl.LOCK_SH)
            try:
                if not (folder / READY).exists():
                    _build(folder, layout, num_rows, fill)
                arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in layout}
            except BaseException:
                os.close(users)
                raise
        finally:
            os.close(build)  # closing the descriptor drops its flock
        return cls(folder, arrays, users)

    def close(self) -> None:
        """Stop using the table; the last user removes its files (idempotent)."""
        self.arrays = {}
        self._closer()

    @staticmethod
    def _release(folder: Path, users: int) -> None:
        try:
            build = _lock(folder / "build.lock", fcntl.LOCK_EX)
        except OSError:
            os.close(users)
            return
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if no one else maps it
            except BlockingIOError:
                return
            (folder / READY).unlink(missing_ok=True)
            for leftover in folder.glob("*.npy*"):
                leftover.unlink(missing_ok=True)
        finally:
            os.close(users)
            os.close(build)


def _build(
    folder: Path,
    layout: dict[str, tuple[tuple[int, ...], np.dtype]],
    num_rows: int,
    fill: Callable[[dict[str, np.ndarray]], None],
) -> None:
    """Decode into ``NAME.npy.tmp`` files, rename them, then mark the table ready."""
    try:
        _fill_temporaries(folder, layout, num_rows, fill)
    except BaseException:
        for temporary in folder.glob("*.npy.tmp"):
            temporary.unlink(missing_ok=True)  # free the shared memory a failed build took
        raise
    for name in layout:
        os.replace(folder / f"{name}.npy.tmp", folder / f"{name}.npy")
    (folder / READY).write_text("")


def _fill_temporaries(
    folder: Path,
    layout: dict[str, tuple[tuple[int, ...], np.dtype]],
    num_rows: int,
    fill: Callable[[dict[str, np.ndarray]], None],
) -> None:
    tables: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in layout.items():
        temporary = folder / f"{name}.npy.tmp"
        table = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=dtype, shape=(num_rows, *shape)
        )
        # Reserve the pages now: a full tmpfs must fail here with ENOSPC, not with SIGBUS
        # when a page of the mapping is first written.
        with open(temporary, "r+b") as stream:
            try:
                os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)
            except OSError as error:
                raise ConfigError(
                    f"no room for the {num_rows}-row shared logit table in {folder.parent} "
                    f"({error.strerror}); set {SHARED_DIR_ENV} to a folder with more space, or "
                    "lower --cache-memory so that the store is streamed chunk by chunk"
                ) from None
        tables[name] = table
    fill(tables)
    for written in tables.values():
        assert isinstance(written, np.memmap)
        written.flush()
