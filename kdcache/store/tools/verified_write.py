"""Writing a whole new store that is published only once it verifies: what convert, merge,
concat and the bridges' imports share.

:func:`write_verified_store` creates the store (a replacement is staged in a sibling folder by
:func:`~kdcache.store.write.writer.create_store`), lets the caller fill it, checks every chunk
with :func:`~kdcache.store.tools.verify.verify_store` and only then marks it complete or swaps it
in. When anything fails, a store this call began is removed and an existing output stays as it
was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kdcache.store.format.location import parse_location
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.swap import remove_store_folder, staging_location
from kdcache.store.write.writer import create_store

if TYPE_CHECKING:
    from kdcache.store.format.layout import StoreLike
    from kdcache.store.format.metadata import StoreMetadata
    from kdcache.store.write.writer import StoreWriter

__all__ = ["finalize_verified", "write_verified_store"]


def write_verified_store(
    out: StoreLike, fill: Callable[[StoreWriter], object], **options: Any
) -> StoreMetadata:
    """Create ``out`` with :func:`~kdcache.store.write.writer.create_store` ``options``, call
    ``fill(writer)`` to write every row, then verify the new store and publish it; return its
    finished metadata. On any failure (the fill's, or a verification problem) the new store is
    discarded and an ``out`` that existed before is left untouched."""
    resolved = parse_location(out).resolved()
    folder = resolved.folder
    created = folder if folder is not None and not os.path.lexists(folder) else None
    writer = create_store(out, **options)
    with writer:
        try:
            fill(writer)
            return finalize_verified(writer, out)
        except BaseException:
            # These commands never resume, so an unfinished store of ours is only clutter.
            staging = staging_location(resolved).folder if writer.replacing else None
            if staging is not None and staging.exists():
                remove_store_folder(staging)  # ours, built under the lock we still hold
            writer.close()
            if created is not None:
                remove_store_folder(created)
            raise


def finalize_verified(writer: StoreWriter, where: StoreLike) -> StoreMetadata:
    """Mark ``writer``'s store complete only once it verifies: a fresh store at ``where``
    before :meth:`~kdcache.store.write.writer.StoreWriter.finalize`, a replacement in its
    staging folder before it is swapped in (the old store then stays as it was)."""
    if not writer.replacing:
        verify_store(where, finishing=True).raise_if_bad()
    return writer.finalize(
        verify=lambda folder: verify_store(folder, finishing=True).raise_if_bad()
    )
