"""Writing a store: create, resume or replace it (:mod:`~kdcache.store.write.target`), fill it
durably under one writer's lock, in the background if asked, and swap a replacement in."""

__all__: list[str] = []
