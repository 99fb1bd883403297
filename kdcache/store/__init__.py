"""The on-disk store and everything that touches it, one subpackage per concern:

* :mod:`~kdcache.store.format`: where a store lives, its arrays, metadata record and checks;
* :mod:`~kdcache.store.write`: creating, resuming, filling and replacing a store;
* :mod:`~kdcache.store.read`: opening a store, checked decoding, the logit feed;
* :mod:`~kdcache.store.ranks`: a store written by the K ranks of a torchrun job;
* :mod:`~kdcache.store.tools`: verify, inspect (the report), pack, convert, merge and concat;
* :mod:`~kdcache.store.bridges`: importing other tools' soft-label files, exporting to DistillKit;
* :mod:`~kdcache.store.sequence`: language-model stores, one row per token.

This package exports the names a user of stores needs. Imports only :mod:`kdcache.logits` and
:mod:`kdcache.errors`; zarr internals stay in :mod:`kdcache.store.format._zarr_compat`.
"""

from kdcache.store.format.layout import StoreLike
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.concat import ConcatResult, concat_stores, link_stores
from kdcache.store.tools.convert import ConvertResult, convert_store
from kdcache.store.tools.merge import MergeResult, merge_stores
from kdcache.store.tools.pack import PackResult, pack_store
from kdcache.store.tools.report import StoreReport, inspect_store
from kdcache.store.tools.verify import VerifyReport, verify_store
from kdcache.store.write.background import BackgroundWriter
from kdcache.store.write.writer import StoreWriter, create_store

__all__ = [
    "BackgroundWriter",
    "ConcatResult",
    "ConvertResult",
    "MergeResult",
    "PackResult",
    "StoreLike",
    "StoreMetadata",
    "StoreReader",
    "StoreReport",
    "StoreWriter",
    "VerifyReport",
    "concat_stores",
    "convert_store",
    "create_sequence_store",
    "create_store",
    "inspect_store",
    "link_stores",
    "merge_stores",
    "open_sequence_store",
    "open_store",
    "pack_store",
    "verify_store",
]
