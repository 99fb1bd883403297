"""One decoded table per node: processes that read the same store share one copy of its logits.

The in-memory feed decodes a whole store into RAM. K ranks of a torchrun job on one machine, or
the J runs of ``kdcache sweep --jobs J``, would each hold their own copy; instead the first
process to arrive decodes the store into memory-mapped ``.npy`` files and every process maps
those files read-only: the node holds one table plus K interpreters.

Tables live in this user's private folder (kdcache.store.read.private_folder: 0700, checked on
its descriptor, files created exclusively with mode 0600 and never followed as links), named by
a hash of what they hold: the store's location, its metadata (generation included), the sha256
of its chunk digest table and, for a local store, when its ``zarr.json`` was last written, with
the arrays' dtypes and shapes. ``NAME.json``, written last, records all that and the sha256 of
each array's bytes. Every process that attaches checks each file (owner, mode, size, npy header:
dtype and shape) and hashes its bytes against that record; a table that fails anything is
removed and decoded again, so a stale, truncated or forged table is never used.

Coordination uses ``flock`` only, which the kernel drops when a process dies:

* ``NAME.lock`` (exclusive) is held while a table is built, checked or removed, so exactly one
  process decodes and nobody maps a half-built table;
* ``NAME.users`` is held shared by every process that maps the table. When a process lets go and
  can take it exclusively, nobody else maps the table, and it deletes the table's files.

A job killed with SIGKILL leaves its table behind: the next job on the same store checks and
reuses it, and every process that opens a table first removes the tables nobody maps any more,
in all of this user's private folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ConfigError
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.read.private_folder import (
    SHARED_DIR_ENV,
    NotOwnedError,
    create_owned_file,
    open_owned_file,
    open_private_folder,
    other_private_folders,
)

__all__ = [
    "SharedTable",
    "store_identity",
    "table_arrays",
    "table_name",
]

_HEADER_FORMAT = "kdcache-shared-table-1"
#: Largest ``NAME.json`` read: a record of a few arrays takes a few kilobytes.
_HEADER_LIMIT = 1 << 20
#: Table names: a hash of what the table holds.
_TABLE_NAME = re.compile(r"[0-9a-f]{24}")

_Layout = dict[str, tuple[tuple[int, ...], np.dtype]]

log = logging.getLogger("kdcache")


class _UnusableTable(Exception):
    """A table on disk that must not be mapped (why, in one phrase)."""


def store_identity(where: str, metadata: StoreMetadata, content_digest: str) -> dict[str, Any]:
    """What a table decoded from a store is bound to: the store's location, metadata, the digest
    of its content and, for a local store, when its ``zarr.json`` was last written (a store
    replaced in place gets a new table). JSON values, as the table's record holds them."""
    location = where if "://" in where else os.path.abspath(where)
    record = Path(location) / "zarr.json"
    written = record.stat().st_mtime_ns if record.is_file() else None
    identity = {
        "store": location,
        "written": written,
        "content": content_digest,
        "metadata": metadata.to_dict(),
    }
    normalized: dict[str, Any] = json.loads(json.dumps(identity, sort_keys=True, default=str))
    return normalized


def table_arrays(layout: _Layout, num_rows: int) -> dict[str, dict[str, Any]]:
    """Each array's dtype and full shape, as the table's record holds them."""
    return {
        name: {"dtype": np.dtype(dtype).str, "shape": [num_rows, *shape]}
        for name, (shape, dtype) in layout.items()
    }


def table_name(identity: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> str:
    """The name of the table holding ``arrays`` decoded from the store ``identity`` describes."""
    record = json.dumps({"identity": identity, "arrays": arrays}, sort_keys=True, default=str)
    return hashlib.sha256(record.encode()).hexdigest()[:24]


class SharedTable:
    """The arrays of one decoded store, mapped read-only from this user's private folder.

    Build or attach with :meth:`open`; :meth:`close` (also run when the object is collected or
    the interpreter exits) unmaps, and removes the files when this was the last user.
    """

    def __init__(
        self, folder: Path, name: str, arrays: dict[str, np.ndarray], handles: tuple[int, int]
    ) -> None:
        self.folder = folder
        self.name = name
        self.arrays = arrays
        self._closer = weakref.finalize(
            self, SharedTable._release, folder, name, *handles, os.getpid()
        )

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    @classmethod
    def open(
        cls,
        identity: dict[str, Any],
        layout: _Layout,
        num_rows: int,
        fill: Callable[[dict[str, np.ndarray]], None],
    ) -> SharedTable:
        """Map the table of the store ``identity`` describes (see :func:`store_identity`), first
        building it with ``fill(writable arrays)`` if no one has or if the one there fails its
        checks.

        ``layout`` maps each array name to its per-row shape and dtype.
        """
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        arrays = table_arrays(layout, num_rows)
        name = table_name(identity, arrays)
        private, folder = open_private_folder()
        try:
            _remove_abandoned(private, folder, keep=name)
            for other, where in other_private_folders(folder):
                _remove_abandoned(other, where, keep="")
            build = _lock(private, folder, f"{name}.lock", fcntl.LOCK_EX)
            try:
                users = _lock(private, folder, f"{name}.users", fcntl.LOCK_SH)
                try:
                    mapped = _attach_or_build(private, folder, name, identity, arrays, fill)
                except BaseException:
                    os.close(users)
                    raise
            finally:
                os.close(build)  # closing the descriptor drops its flock
        except BaseException:
            os.close(private)
            raise
        return cls(folder, name, mapped, (private, users))

    def close(self) -> None:
        """Stop using the table; the last user removes its files (idempotent)."""
        self.arrays = {}
        self._closer()

    @staticmethod
    def _release(folder: Path, name: str, private: int, users: int, owner: int) -> None:
        try:
            if os.getpid() != owner:
                return  # a forked child shares the owner's lock: only the owner may let go
            with contextlib.suppress(OSError, ConfigError, BlockingIOError):
                build = _lock(private, folder, f"{name}.lock", fcntl.LOCK_EX)
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if no one maps it
                    _remove_files(private, name, locks=True)
                finally:
                    os.close(build)
        finally:
            os.close(users)
            os.close(private)


def _lock(private: int, folder: Path, name: str, mode: int) -> int:
    """A descriptor of lock file ``name`` holding ``flock(mode)``; the file is made if absent
    and taken again if it was removed while this process waited."""
    while True:
        try:
            descriptor = open_owned_file(private, name, os.O_RDWR, create=True)
        except NotOwnedError as why:
            raise ConfigError(
                f"{folder / name} is not a lock file kdcache made ({why}); remove it"
            ) from None
        except OSError as error:
            raise ConfigError(
                f"cannot use {folder} for the shared logit table: {error.strerror}; set "
                f"{SHARED_DIR_ENV} to a writable folder on a local (ideally in-memory) filesystem"
            ) from None
        try:
            fcntl.flock(descriptor, mode)
        except BaseException:
            os.close(descriptor)
            raise
        if os.fstat(descriptor).st_nlink:
            return descriptor
        os.close(descriptor)


def _remove_files(private: int, name: str, *, locks: bool) -> None:
    """Remove table ``name``'s files, its record first (and its lock files if ``locks``)."""
    kept = set() if locks else {f"{name}.lock", f"{name}.users"}
    entries = [f"{name}.json", *sorted(os.listdir(private))]
    for entry in entries:
        if entry.startswith(f"{name}.") and entry not in kept:
            with contextlib.suppress(OSError):  # gone already; a folder there fails its creation
                os.unlink(entry, dir_fd=private)


def _remove_abandoned(private: int, folder: Path, *, keep: str) -> None:
    """Remove the tables no process maps (left by killed jobs), except table ``keep``."""
    names = {entry.split(".", 1)[0] for entry in os.listdir(private)} - {keep}
    for name in sorted(n for n in names if _TABLE_NAME.fullmatch(n)):
        try:
            build = _lock(private, folder, f"{name}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, ConfigError):
            continue
        try:
            users = _lock(private, folder, f"{name}.users", fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(users)
            _remove_files(private, name, locks=True)
        except (BlockingIOError, ConfigError):
            continue
        finally:
            os.close(build)


def _attach_or_build(
    private: int,
    folder: Path,
    name: str,
    identity: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    fill: Callable[[dict[str, np.ndarray]], None],
) -> dict[str, np.ndarray]:
    try:
        return _attach(private, name, identity, arrays)
    except FileNotFoundError:
        pass
    except _UnusableTable as why:
        log.warning("shared table %s: %s; decoding the store again", folder / name, why)
    _remove_files(private, name, locks=False)
    _build(private, folder, name, identity, arrays, fill)
    try:
        return {
            array: _map(private, f"{name}.{array}.npy", expected, checksum=None)
            for array, expected in arrays.items()
        }
    except _UnusableTable as why:
        raise ConfigError(
            f"the shared table {folder / name} changed while it was being built ({why}); is "
            "another program writing in that folder? Start the run again"
        ) from None


def _read_record(private: int, name: str) -> dict[str, Any]:
    try:
        descriptor = open_owned_file(private, f"{name}.json", os.O_RDONLY, create=False)
    except NotOwnedError as why:
        raise _UnusableTable(f"its record is {why}") from None
    with os.fdopen(descriptor, "rb") as stream:
        raw = stream.read(_HEADER_LIMIT + 1)
    if len(raw) > _HEADER_LIMIT:
        raise _UnusableTable(f"its record is larger than {_HEADER_LIMIT} bytes")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        raise _UnusableTable("its record is not JSON") from None
    if not isinstance(record, dict):
        raise _UnusableTable("its record is not a JSON object")
    return record


def _attach(
    private: int, name: str, identity: dict[str, Any], arrays: dict[str, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Map table ``name`` after checking its record, its files and the sha256 of its bytes."""
    record = _read_record(private, name)
    if record.get("format") != _HEADER_FORMAT or record.get("identity") != identity:
        raise _UnusableTable("its record names another store or table format")
    sums = record.get("sha256")
    if record.get("arrays") != arrays or not isinstance(sums, dict) or set(sums) != set(arrays):
        raise _UnusableTable("its record names other arrays, shapes or dtypes")
    return {
        array: _map(private, f"{name}.{array}.npy", expected, checksum=str(sums[array]))
        for array, expected in arrays.items()
    }


def _map(
    private: int, file_name: str, expected: dict[str, Any], *, checksum: str | None
) -> np.ndarray:
    """Map ``file_name`` read-only once its npy header matches ``expected``, its size the header
    and (when ``checksum`` is given) its bytes the sha256."""
    try:
        descriptor = open_owned_file(private, file_name, os.O_RDONLY, create=False)
    except NotOwnedError as why:
        raise _UnusableTable(f"{file_name} is {why}") from None
    except FileNotFoundError:
        raise _UnusableTable(f"{file_name} is missing") from None
    dtype, shape = np.dtype(expected["dtype"]), tuple(expected["shape"])
    header = _npy_header(dtype, shape)
    with os.fdopen(descriptor, "rb") as stream:
        # Compared byte for byte with the header this table's builder writes: a damaged header
        # is never parsed (numpy evaluates it as a Python literal).
        if stream.read(len(header)) != header:
            raise _UnusableTable(
                f"{file_name} does not start with the npy header of {dtype} {shape} in C order"
            )
        offset = stream.tell()
        size, wanted = os.fstat(descriptor).st_size, offset + dtype.itemsize * int(np.prod(shape))
        if size != wanted:
            raise _UnusableTable(f"{file_name} holds {size} bytes, not {wanted}")
        table = np.memmap(stream, dtype=dtype, mode="r", offset=offset, shape=shape)
    if checksum is not None and hashlib.sha256(table.data).hexdigest() != checksum:
        raise _UnusableTable(f"the bytes of {file_name} do not match their recorded sha256")
    return table


def _build(
    private: int,
    folder: Path,
    name: str,
    identity: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    fill: Callable[[dict[str, np.ndarray]], None],
) -> None:
    """Decode into new files ``NAME.ARRAY.npy``, then write the record that makes them a table."""
    tables: dict[str, np.memmap] = {}
    made: list[str] = []
    try:
        for array, expected in arrays.items():
            file_name = f"{name}.{array}.npy"
            try:
                descriptor = create_owned_file(private, file_name)
            except OSError as error:
                raise ConfigError(
                    f"cannot create {folder / file_name} for the shared logit table: "
                    f"{error.strerror}; remove what is there"
                ) from None
            made.append(file_name)
            tables[array] = _new_array(descriptor, folder, expected)
        fill(dict(tables))
        for table in tables.values():
            table.flush()
        sums = {array: hashlib.sha256(table.data).hexdigest() for array, table in tables.items()}
        _write_record(private, folder, name, identity, arrays, sums)
    except BaseException:
        tables.clear()
        for file_name in made:  # free the shared memory a failed build took
            with contextlib.suppress(OSError):
                os.unlink(file_name, dir_fd=private)
        raise


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The npy (version 1.0) header of a C-ordered ``dtype`` array of ``shape``."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _new_array(descriptor: int, folder: Path, expected: dict[str, Any]) -> np.memmap:
    dtype, shape = np.dtype(expected["dtype"]), tuple(expected["shape"])
    with os.fdopen(descriptor, "r+b") as stream:
        stream.write(_npy_header(dtype, shape))
        stream.flush()
        size = stream.tell() + dtype.itemsize * int(np.prod(shape))
        # Reserve the pages now: a full tmpfs must fail here with ENOSPC, not with SIGBUS
        # when a page of the mapping is first written.
        try:
            os.posix_fallocate(descriptor, 0, size)
        except OSError as error:
            raise ConfigError(
                f"no room for the {shape[0]}-row shared logit table in {folder.parent} "
                f"({error.strerror}); set {SHARED_DIR_ENV} to a folder with more space, or "
                "lower --cache-memory so that the store is streamed chunk by chunk"
            ) from None
        return np.memmap(stream, dtype=dtype, mode="r+", offset=stream.tell(), shape=shape)


def _write_record(
    private: int,
    folder: Path,
    name: str,
    identity: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    sums: dict[str, str],
) -> None:
    """Write ``NAME.json`` (through a new temporary, renamed): the table is complete."""
    record = {"format": _HEADER_FORMAT, "identity": identity, "arrays": arrays, "sha256": sums}
    temporary = f"{name}.json.tmp"
    try:
        descriptor = create_owned_file(private, temporary)
    except OSError as error:
        raise ConfigError(
            f"cannot create {folder / temporary} for the shared logit table: {error.strerror}; "
            "remove what is there"
        ) from None
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(json.dumps(record, sort_keys=True).encode())
    try:
        os.replace(temporary, f"{name}.json", src_dir_fd=private, dst_dir_fd=private)
    except OSError as error:
        os.unlink(temporary, dir_fd=private)
        raise ConfigError(
            f"cannot write {folder / name}.json for the shared logit table: {error.strerror}; "
            "remove what is there"
        ) from None
