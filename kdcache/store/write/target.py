"""Whether ``create_store`` starts a store, resumes one or builds a replacement, and where.

:func:`open_for_writing` makes the create/resume/overwrite decision for
:func:`kdcache.store.write.writer.create_store`; the arrays themselves are made by
:mod:`kdcache.store.write.creation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdcache.errors import StoreExistsError
from kdcache.logits.encodings import Encoding
from kdcache.store.format.layout import (
    LABELS_ARRAY,
    VIEW_PARAMS_ARRAY,
    WRITTEN_ARRAY,
    has_array,
)
from kdcache.store.format.location import (
    StoreLocation,
    remove_partial_files,
    zarr_store,
)
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.write.creation import (
    check_resumable,
    check_same_arrays,
    clear_staging,
    create_arrays,
    existing_store,
    known_keys,
    staged_store,
    staging_purpose,
)
from kdcache.store.write.swap import refuse_foreign_entries, staging_location
from kdcache.temporaries import create_folder, own_folder_exists

__all__ = [
    "WriteTarget",
    "open_for_writing",
]


@dataclass(frozen=True)
class WriteTarget:
    """The group a writer fills, its metadata, and (staging folder, store folder) when it builds
    a replacement that ``finalize`` swaps in."""

    group: zarr.Group
    metadata: StoreMetadata
    replaces: tuple[Path, Path] | None = None


def open_for_writing(
    location: StoreLocation,
    store: Any,
    metadata: StoreMetadata,
    codec: Encoding,
    label_values: np.ndarray | None,
    view_params: np.ndarray | None,
    *,
    resume: bool,
    overwrite: bool,
    further: dict[str, np.ndarray] | None = None,
) -> WriteTarget:
    """Where a writer of ``metadata`` at ``location`` writes: a fresh store, the interrupted one
    it resumes, or a staging replacement; refuses anything it must not touch. The caller holds
    the store's writer lock. ``further`` are arrays written once beside the labels
    (kdcache.store.write.creation.create_arrays)."""
    where = location.text
    given = {LABELS_ARRAY: label_values, VIEW_PARAMS_ARRAY: view_params, **(further or {})}
    existing = existing_store(location, store)
    if existing is None:
        if not location.is_empty():
            raise StoreExistsError(
                f"{where} exists and is not a kdcache store; choose another path (kdcache never "
                "deletes it)"
            )
        return _new_store(store, metadata, codec, label_values, view_params, further)
    group, old = existing
    if resume and not overwrite:
        if not old.complete:
            check_resumable(old, metadata, where)
            remove_partial_files(location)  # temporary files of a killed writer; we hold the lock
            if has_array(group, WRITTEN_ARRAY) and all(
                has_array(group, name) for name in further or {}
            ):
                check_same_arrays(group, old, given, where)
                return WriteTarget(group, old)
            # Killed while creating the arrays (or, before they were created with the store,
            # before a sequence store's offsets were written): nothing was computed yet.
            return _new_store(store, metadata, codec, label_values, view_params, further)
        if location.folder is not None:
            resumed = _resume_replacement(location, metadata, where, given)
            if resumed is not None:
                return resumed
    if not overwrite:
        if old.complete:
            raise StoreExistsError(
                f"{where} already holds a complete store; pass --overwrite to replace it, or "
                "choose another path"
            )
        raise StoreExistsError(
            f"{where} holds an interrupted dump; pass --resume to continue it or --overwrite to "
            "start over"
        )
    root = location.folder
    if root is None:
        # Object stores cannot swap a prefix atomically: the old store goes first (docs/sharing.md).
        return _new_store(store, metadata, codec, label_values, view_params, further)
    refuse_foreign_entries(root, known_keys(group, old), where)
    staging = staging_location(location)
    clear_staging(staging, where)
    create_folder(staging.target, purpose=staging_purpose(where))
    return _new_store(
        zarr_store(staging, read_only=False),
        metadata,
        codec,
        label_values,
        view_params,
        further,
        replaces=(Path(staging.target), root),
    )


def _resume_replacement(
    location: StoreLocation,
    metadata: StoreMetadata,
    where: str,
    given: dict[str, np.ndarray | None],
) -> WriteTarget | None:
    """The staging store of an interrupted ``--overwrite`` of ``location``, if one waits."""
    staging = staging_location(location)
    if not own_folder_exists(staging.target, purpose=staging_purpose(where)):
        return None
    existing = staged_store(staging)
    if existing is None or existing[1].complete or not has_array(existing[0], WRITTEN_ARRAY):
        return None
    group, old = existing
    check_resumable(old, metadata, where)
    check_same_arrays(group, old, given, where)
    remove_partial_files(staging)
    return WriteTarget(group, old, replaces=(Path(staging.target), Path(location.target)))


def _new_store(
    store: Any,
    metadata: StoreMetadata,
    codec: Encoding,
    label_values: np.ndarray | None,
    view_params: np.ndarray | None,
    further: dict[str, np.ndarray] | None = None,
    *,
    replaces: tuple[Path, Path] | None = None,
) -> WriteTarget:
    """A fresh store created in ``store`` (emptied first)."""
    group, metadata = create_arrays(store, metadata, codec, label_values, view_params, further)
    return WriteTarget(group, metadata, replaces=replaces)
