"""Reading a store: :func:`~kdcache.store.read.reader.open_store`, the checks before any decoded
row is used, and the logit feed that serves training batches from RAM."""

__all__: list[str] = []
