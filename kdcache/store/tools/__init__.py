"""Tools over a finished store: ``verify``, ``inspect`` (the report) and ``pack`` (one zip)."""

__all__: list[str] = []
