"""The few zarr-python internals kdcache relies on, in one place to update when zarr changes.

Public zarr has no call for "does this chunk's object exist" (reading an absent chunk yields fill
values) nor a synchronous way to run the store's async key listing; both are needed to tell a
lost chunk from a written one and to copy a store object by object.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

T = TypeVar("T")

__all__ = [
    "buffer_prototype",
    "has_key",
    "open_zip_now",
    "read_group_key",
    "row_chunk_exists",
    "row_chunk_key",
    "run_sync",
]


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on zarr's own event loop (the one its stores are bound to)."""
    return sync(coroutine)


def buffer_prototype() -> Any:
    """The buffer prototype that ``Store.get`` needs."""
    return default_buffer_prototype()


def row_chunk_key(array: Any, chunk: int) -> str:
    """The store key (relative to the store's root) of row chunk ``chunk`` of ``array``."""
    extra = (0,) * (array.ndim - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key((chunk, *extra))}"


def row_chunk_exists(array: Any, chunk: int) -> bool:
    """Whether the object of row chunk ``chunk`` of ``array`` is present in its store."""
    return bool(sync(array.store_path.store.exists(row_chunk_key(array, chunk))))


def open_zip_now(store: Any) -> None:
    """Open a ZipStore's file at once (zarr opens it lazily, at the first read)."""
    store._sync_open()


def has_key(group: Any, key: str) -> bool:
    """Whether ``key`` (relative to ``group``) exists in the group's store, without parsing it."""
    store, prefix = group.store_path.store, group.store_path.path
    return bool(sync(store.exists(f"{prefix}/{key}" if prefix else key)))


def read_group_key(group: Any, key: str) -> bytes | None:
    """The raw bytes stored under ``key`` relative to ``group`` (``None`` when absent)."""
    store, prefix = group.store_path.store, group.store_path.path
    value = sync(store.get(f"{prefix}/{key}" if prefix else key, prototype=buffer_prototype()))
    return None if value is None else value.to_bytes()
