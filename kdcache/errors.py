"""The errors kdcache raises for bad input, missing files and untrustworthy stores.

Every error a user can cause derives from :class:`KdcacheError`. The CLI prints such an error as
one line (what was wrong, what was expected, how to fix it) and exits non-zero; anything else is a
bug and keeps its traceback. Most classes also derive from the matching builtin, so callers of the
Python API can catch ``ValueError`` or ``FileNotFoundError`` as usual.
"""

from __future__ import annotations


class KdcacheError(Exception):
    """Base class of every user-facing kdcache error."""


class ConfigError(KdcacheError, ValueError):
    """An option or constructor argument is out of its valid range."""


class SpecError(KdcacheError, ValueError):
    """A model, dataset or encoding spec names nothing kdcache knows."""


class DatasetNotFoundError(KdcacheError, FileNotFoundError):
    """A dataset's files are not where its spec says (kdcache never downloads)."""


class CheckpointError(KdcacheError, ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


class StoreError(KdcacheError):
    """Base class of the errors about a logit store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the given path or URL."""


class StoreFormatError(StoreError, ValueError):
    """The path holds something that is not a kdcache store this version can read."""


class StoreIncompleteError(StoreError):
    """The store's dump has not finished (or was interrupted)."""


class StoreMismatchError(StoreError, ValueError):
    """The store does not belong to the dataset or model it is used with."""


class StoreCorruptError(StoreError):
    """Stored bytes fail their checksum or hold non-finite logits."""


class StoreExistsError(StoreError, FileExistsError):
    """A complete store already exists where a new one would be written."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class InvalidLogitsError(KdcacheError, ValueError):
    """Logits handed to a store are non-finite or have the wrong shape."""


class StoreWriteError(StoreError, OSError):
    """The store cannot be written (unwritable path, full disk); a dump stays resumable."""


class PathInTheWayError(KdcacheError, FileExistsError):
    """Something kdcache did not create sits where it would put a temporary file or folder."""


class ResumeMismatchError(ConfigError):
    """An interrupted run's saved state does not fit the run asked to continue it (other options,
    ranks, data, model or store reading)."""


class WorkerError(KdcacheError):
    """A worker process of ``sweep --jobs`` could not start, died, or failed on a bug."""
