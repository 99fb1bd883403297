"""The on-disk store and everything that touches it: location, layout, writer, reader, feed, tools.

Imports only :mod:`kdcache.logits` and :mod:`kdcache.errors`; zarr internals stay in
:mod:`kdcache.store._zarr_compat`.
"""

from kdcache.store.layout import StoreLike
from kdcache.store.metadata import StoreMetadata
from kdcache.store.pack import PackResult, pack_store
from kdcache.store.reader import StoreReader, open_store
from kdcache.store.report import StoreReport, inspect_store
from kdcache.store.verify import VerifyReport, verify_store
from kdcache.store.writer import StoreWriter, create_store

__all__ = [
    "PackResult",
    "StoreLike",
    "StoreMetadata",
    "StoreReader",
    "StoreReport",
    "StoreWriter",
    "VerifyReport",
    "create_store",
    "inspect_store",
    "open_store",
    "pack_store",
    "verify_store",
]
