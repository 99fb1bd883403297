"""What a store is on disk: where it lives, its arrays, its metadata record and schema, the
pinned array metadata and the per-chunk digests. Readers and writers both build on it."""

# Imported for its registration: zarr (and numcodecs) must know the kdcache.packed_ints codec
# before any store's arrays are opened.
from kdcache.store.format import packed_ints  # noqa: F401

__all__: list[str] = []
