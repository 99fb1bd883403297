"""kdcache: run the teacher once, cache its logits in Zarr, distill students from the cache.

The public API; the ``kdcache`` command line is a thin layer over it and this package imports
without click.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.dump import DumpResult, dump_teacher
from kdcache.errors import KdcacheError
from kdcache.inspect import StoreReport, inspect_store
from kdcache.losses import AttentionLogitsLoss, FocalDistillationLoss, LogitsDistillationLoss
from kdcache.metadata import StoreMetadata
from kdcache.pack import PackResult, pack_store
from kdcache.sparse import SparseLogits
from kdcache.reader import StoreReader, open_store
from kdcache.store import StoreWriter, create_store
from kdcache.sweep import SweepConfig, SweepResult, run_sweep
from kdcache.training import RunResult, distill, train
from kdcache.verify import VerifyReport, verify_store

__all__ = [
    "AttentionLogitsLoss",
    "DistillConfig",
    "DumpConfig",
    "DumpResult",
    "FocalDistillationLoss",
    "KdcacheError",
    "LogitsDistillationLoss",
    "PackResult",
    "RunResult",
    "SparseLogits",
    "StoreMetadata",
    "StoreReader",
    "StoreReport",
    "StoreWriter",
    "SweepConfig",
    "SweepResult",
    "TrainConfig",
    "VerifyReport",
    "__version__",
    "create_store",
    "distill",
    "dump_teacher",
    "inspect_store",
    "open_store",
    "pack_store",
    "run_sweep",
    "train",
    "verify_store",
]
