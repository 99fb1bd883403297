"""kdcache: run the teacher once, cache its logits in Zarr, distill students from the cache.

The public API; the ``kdcache`` command line is a thin layer over it and this package imports
without click.
"""

from __future__ import annotations

from kdcache._version import __version__
from kdcache.augment.recipe import Recipe, parse_recipe
from kdcache.augment.views import augment_record
from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.dump import DumpResult, dump_teacher
from kdcache.errors import KdcacheError
from kdcache.logits.losses import AttentionLogitsLoss, FocalDistillationLoss, LogitsDistillationLoss
from kdcache.logits.sequence_losses import TokenDistillationLoss
from kdcache.logits.sparse import SparseLogits
from kdcache.store.background import BackgroundWriter
from kdcache.store.metadata import StoreMetadata
from kdcache.store.pack import PackResult, pack_store
from kdcache.store.reader import StoreReader, open_store
from kdcache.store.report import StoreReport, inspect_store
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.verify import VerifyReport, verify_store
from kdcache.store.writer import StoreWriter, create_store
from kdcache.train.loop import RunResult, distill, train
from kdcache.train.pairing import TeacherLogits
from kdcache.train.sweep import SweepConfig, SweepResult, run_sweep

__all__ = [
    "AttentionLogitsLoss",
    "BackgroundWriter",
    "DistillConfig",
    "DumpConfig",
    "DumpResult",
    "FocalDistillationLoss",
    "KdcacheError",
    "LogitsDistillationLoss",
    "PackResult",
    "Recipe",
    "RunResult",
    "SparseLogits",
    "StoreMetadata",
    "StoreReader",
    "StoreReport",
    "StoreWriter",
    "SweepConfig",
    "SweepResult",
    "TeacherLogits",
    "TokenDistillationLoss",
    "TrainConfig",
    "VerifyReport",
    "__version__",
    "augment_record",
    "create_sequence_store",
    "create_store",
    "distill",
    "dump_teacher",
    "inspect_store",
    "open_sequence_store",
    "open_store",
    "pack_store",
    "parse_recipe",
    "run_sweep",
    "train",
    "verify_store",
]
