"""What a store is on disk: where it lives, its arrays, its metadata record and schema, the
pinned array metadata and the per-chunk digests. Readers and writers both build on it."""
