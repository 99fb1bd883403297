"""kdcache: run the teacher once, cache its logits in Zarr, distill students from the cache."""

from __future__ import annotations

__version__ = "0.1.0"
