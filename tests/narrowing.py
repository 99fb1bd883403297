"""Narrow the unions the public API returns to what a test knows it holds, checking as it goes.

A store reads dense tensors or sparse rows depending on its encoding, a reader's feed is any
:class:`~kdcache.store.read.feed.Feed`, zarr types a group's members as ``Array | Group`` and its
attributes as any JSON value, and metadata records are optional: a test knows which one it has,
and says so here (a wrong guess fails the test).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch
import zarr

from kdcache.logits.sparse import SparseLogits
from kdcache.store.read.logit_feed import LogitFeed

T = TypeVar("T")


def dense(rows: object) -> torch.Tensor:
    """Rows read from a store with a dense encoding (float32, float16, int8, ...)."""
    assert isinstance(rows, torch.Tensor), type(rows)
    return rows


def sparse(rows: object) -> SparseLogits:
    """Rows read from a ``topk:K`` store."""
    assert isinstance(rows, SparseLogits), type(rows)
    return rows


def logit_feed(feed: object) -> LogitFeed:
    """The feed of a store of rows (a joined store's feed gathers from its parts' feeds)."""
    assert isinstance(feed, LogitFeed), type(feed)
    return feed


def present(value: T | None) -> T:
    """An optional value (a metadata record, a fidelity report) the test expects to be there."""
    assert value is not None
    return value


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a raw store group."""
    array = group[name]
    assert isinstance(array, zarr.Array), type(array)
    return array


def kdcache_record(group: zarr.Group) -> dict[str, Any]:
    """A copy of the ``kdcache`` attribute of a raw store group: its metadata record."""
    record = group.attrs["kdcache"]
    assert isinstance(record, Mapping), type(record)
    return dict(record)


def stored(group: zarr.Group, name: str) -> np.ndarray:
    """All the values of the array ``name`` of a raw store group."""
    values = zarr_array(group, name)[:]
    assert isinstance(values, np.ndarray), type(values)
    return values
