"""Augmentation-consistent caching: recipes, per-view parameters, view order and view inputs.

A store with V views holds, for every sample, the teacher's logits on V augmented inputs and
the parameters that recreate each input exactly (docs/augmentation.md). Imports only
:mod:`kdcache.errors` and :mod:`kdcache.store`. ``Recipe`` and ``parse_recipe`` load on first
use, so :mod:`kdcache.augment.catalog` (what the CLI's help lists) imports without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdcache.augment.recipe import Recipe, parse_recipe

__all__ = ["Recipe", "parse_recipe"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("kdcache.augment.recipe"), name)
    raise AttributeError(f"module 'kdcache.augment' has no attribute {name!r}")
