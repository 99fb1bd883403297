"""Augmentation-consistent caching: recipes, per-view parameters, view order and view inputs.

A store with V views holds, for every sample, the teacher's logits on V augmented inputs and
the parameters that recreate each input exactly (docs/augmentation.md). Imports only
:mod:`kdcache.errors` and :mod:`kdcache.store`.
"""

from kdcache.augment.recipe import Recipe, parse_recipe

__all__ = ["Recipe", "parse_recipe"]
