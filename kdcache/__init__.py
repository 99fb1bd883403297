"""kdcache: run the teacher once, cache its logits in Zarr, distill students from the cache.

The public API; the ``kdcache`` command line is a thin layer over it and this package imports
without click. Each name is imported from its module on first use, so that ``import kdcache``
(and so every ``kdcache`` command, ``--help`` included) does not pay for torch until it needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from kdcache._version import __version__

if TYPE_CHECKING:
    from kdcache.augment.recipe import Recipe, parse_recipe
    from kdcache.augment.views import augment_record
    from kdcache.config import DistillConfig, DumpConfig, SweepConfig, TrainConfig
    from kdcache.dump.teacher import DumpResult, dump_teacher
    from kdcache.errors import KdcacheError
    from kdcache.logits.losses import (
        AttentionLogitsLoss,
        FocalDistillationLoss,
        LogitsDistillationLoss,
    )
    from kdcache.logits.sequence_losses import TokenDistillationLoss
    from kdcache.logits.sparse import SparseLogits
    from kdcache.store.format.metadata import StoreMetadata
    from kdcache.store.read.reader import StoreReader, open_store
    from kdcache.store.sequence import create_sequence_store, open_sequence_store
    from kdcache.store.tools.convert import ConvertResult, convert_store
    from kdcache.store.tools.merge import MergeResult, merge_stores
    from kdcache.store.tools.pack import PackResult, pack_store
    from kdcache.store.tools.report import StoreReport, inspect_store
    from kdcache.store.tools.verify import VerifyReport, verify_store
    from kdcache.store.write.background import BackgroundWriter
    from kdcache.store.write.writer import StoreWriter, create_store
    from kdcache.train.loop import RunResult, distill, train
    from kdcache.train.pairing import TeacherLogits
    from kdcache.train.sweep import SweepResult, run_sweep

#: The module that defines each public name.
_DEFINED_IN = {
    "AttentionLogitsLoss": "kdcache.logits.losses",
    "BackgroundWriter": "kdcache.store.write.background",
    "ConvertResult": "kdcache.store.tools.convert",
    "DistillConfig": "kdcache.config",
    "DumpConfig": "kdcache.config",
    "DumpResult": "kdcache.dump.teacher",
    "FocalDistillationLoss": "kdcache.logits.losses",
    "KdcacheError": "kdcache.errors",
    "LogitsDistillationLoss": "kdcache.logits.losses",
    "MergeResult": "kdcache.store.tools.merge",
    "PackResult": "kdcache.store.tools.pack",
    "Recipe": "kdcache.augment.recipe",
    "RunResult": "kdcache.train.loop",
    "SparseLogits": "kdcache.logits.sparse",
    "StoreMetadata": "kdcache.store.format.metadata",
    "StoreReader": "kdcache.store.read.reader",
    "StoreReport": "kdcache.store.tools.report",
    "StoreWriter": "kdcache.store.write.writer",
    "SweepConfig": "kdcache.config",
    "SweepResult": "kdcache.train.sweep",
    "TeacherLogits": "kdcache.train.pairing",
    "TokenDistillationLoss": "kdcache.logits.sequence_losses",
    "TrainConfig": "kdcache.config",
    "VerifyReport": "kdcache.store.tools.verify",
    "augment_record": "kdcache.augment.views",
    "convert_store": "kdcache.store.tools.convert",
    "create_sequence_store": "kdcache.store.sequence",
    "create_store": "kdcache.store.write.writer",
    "distill": "kdcache.train.loop",
    "dump_teacher": "kdcache.dump.teacher",
    "inspect_store": "kdcache.store.tools.report",
    "merge_stores": "kdcache.store.tools.merge",
    "open_sequence_store": "kdcache.store.sequence",
    "open_store": "kdcache.store.read.reader",
    "pack_store": "kdcache.store.tools.pack",
    "parse_recipe": "kdcache.augment.recipe",
    "run_sweep": "kdcache.train.sweep",
    "train": "kdcache.train.loop",
    "verify_store": "kdcache.store.tools.verify",
}


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_DEFINED_IN[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package module: a public name stays itself when a submodule of that name loads."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the subpackage kdcache.train binds it on the package under the name of the
        # public function train(); the function keeps that name (the subpackage stays reachable
        # through sys.modules and every import statement).
        if name in _DEFINED_IN and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AttentionLogitsLoss",
    "BackgroundWriter",
    "ConvertResult",
    "DistillConfig",
    "DumpConfig",
    "DumpResult",
    "FocalDistillationLoss",
    "KdcacheError",
    "LogitsDistillationLoss",
    "MergeResult",
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
    "convert_store",
    "create_sequence_store",
    "create_store",
    "distill",
    "dump_teacher",
    "inspect_store",
    "merge_stores",
    "open_sequence_store",
    "open_store",
    "pack_store",
    "parse_recipe",
    "run_sweep",
    "train",
    "verify_store",
]
