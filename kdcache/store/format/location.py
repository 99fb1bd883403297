"""One way to open anything that can hold a store: a folder, an fsspec URL or a ``.zip`` file.

``s3://`` goes through s3fs and botocore, which read the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` for S3-compatible servers). Zip files are read-only: write a store into a
folder and pack it with :func:`kdcache.store.tools.pack.pack_store`.
"""

from __future__ import annotations

import lzma
import os
import re
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from kdcache.errors import ConfigError, StoreFormatError, StoreNotFoundError
from kdcache.store.format._zarr_compat import open_zip_now, run_sync

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = [
    "ZIP_ERRORS",
    "LocalLocation",
    "RemoteLocation",
    "StoreLocation",
    "ZipLocation",
    "forget_cached_listings",
    "parse_location",
    "partial_files",
    "refuse_inside_store",
    "remove_partial_files",
    "zarr_store",
]

#: What :func:`parse_location` accepts, for error messages and docs.
_SUPPORTED_LOCATIONS = (
    "a local path, file://PATH, s3://BUCKET/PATH (AWS_* environment variables, including "
    "AWS_ENDPOINT_URL for S3-compatible servers), gs://, az://, memory:// or any other fsspec "
    "protocol whose package is installed, or a PATH.zip written by `kdcache pack` (read-only)"
)
#: Backends a protocol needs, to say what to install when it is missing.
_BACKEND_PACKAGES = {
    "s3": "s3fs (pip install 'kdcache[s3]')",
    "s3a": "s3fs (pip install 'kdcache[s3]')",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}
#: What Python's zipfile raises for a damaged zip: a bad header, an unknown "version" field, a
#: member cut short, or a compression method flipped to one whose stream then fails.
ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error, lzma.LZMAError)
#: Protocols fsspec can read but never write.
_READ_ONLY_SCHEMES = ("http", "https", "zip", "tar", "github", "ftp")
# : zarr's LocalStore writes ``KEY.<uuid4 hex>.partial`` and renames it; a leftover is a crashed
# write.
_PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")


@dataclass(frozen=True)
class StoreLocation(ABC):
    """Where a store lives: one subclass per kind of place (:attr:`kind`: ``local``, ``zip`` or
    ``remote``), each knowing how to open and inspect it. ``target`` is a filesystem path (local,
    zip) or a URL (remote); ``text`` is what the user wrote."""

    kind: ClassVar[str]

    text: str
    target: str

    def __str__(self) -> str:
        return self.text

    @property
    def folder(self) -> Path | None:
        """The folder on local disk that holds the store's files, which a writer can replace
        atomically; ``None`` for a zip or a remote store."""
        return None

    @abstractmethod
    def zarr_store(self, *, read_only: bool) -> Store:
        """A zarr store object for this location; see :func:`zarr_store`."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether anything at all is stored here."""

    def is_empty(self) -> bool:
        """Whether nothing is stored here (missing, or an empty folder or prefix)."""
        return not self.exists()

    def partial_files(self) -> list[Path]:
        """Temporary files a killed writer left behind; only local folders can hold them."""
        return []

    @abstractmethod
    def nbytes(self) -> int | None:
        """Bytes the store occupies on disk; ``None`` for a remote store."""

    def resolved(self) -> StoreLocation:
        """This location with its local path made absolute and free of links and ``.`` parts.

        Writers key their lock and staging folder by this path, so ``alias.zarr`` (a link to the
        store) or ``store.zarr/.`` name the same store as ``store.zarr``.
        """
        return type(self)(self.text, str(Path(self.target).resolve()))

    def with_suffix(self, suffix: str) -> StoreLocation:
        """The location of the same kind whose text and target end in ``suffix``."""
        return type(self)(self.text + suffix, self.target + suffix)


class LocalLocation(StoreLocation):
    """A folder on local disk, read and written in place."""

    kind = "local"

    @property
    def folder(self) -> Path:
        return Path(self.target)

    def zarr_store(self, *, read_only: bool) -> Store:
        from zarr.storage import LocalStore

        return LocalStore(self.target, read_only=read_only)

    def exists(self) -> bool:
        return Path(self.target).exists()

    def is_empty(self) -> bool:
        root = Path(self.target)
        return not root.exists() or (root.is_dir() and not any(root.iterdir()))

    def partial_files(self) -> list[Path]:
        root = Path(self.target)
        if not root.is_dir():
            return []
        return sorted(path for path in root.rglob("*.partial") if _PARTIAL_FILE.search(path.name))

    def nbytes(self) -> int | None:
        return _disk_nbytes(Path(self.target))


class ZipLocation(StoreLocation):
    """A ``.zip`` file on local disk written by ``kdcache pack``: read-only."""

    kind = "zip"

    def zarr_store(self, *, read_only: bool) -> Store:
        from zarr.storage import ZipStore

        if not read_only:
            raise ConfigError(
                f"{self} is a zip file, and zip stores are read-only; write the store into a "
                "folder, then pack it with `kdcache pack STORE OUT.zip`"
            )
        if not Path(self.target).is_file():
            raise StoreNotFoundError(f"no store at {self}; check the path or run `kdcache pack`")
        if not zipfile.is_zipfile(self.target):
            raise StoreFormatError(
                f"{self} is not a zip file kdcache can read; pass a zip written by `kdcache pack`"
            )
        try:
            store = ZipStore(self.target, mode="r")
            open_zip_now(store)  # a damaged central directory fails here, not at the first read
        except (*ZIP_ERRORS, OSError, ValueError) as error:
            raise StoreFormatError(
                f"{self} is a damaged zip file ({error}); pack the store again"
            ) from None
        return store

    def exists(self) -> bool:
        return Path(self.target).exists()

    def nbytes(self) -> int | None:
        return _disk_nbytes(Path(self.target))


class RemoteLocation(StoreLocation):
    """An fsspec URL (``s3://``, ``gs://``, ``memory://``...)."""

    kind = "remote"

    def zarr_store(self, *, read_only: bool) -> Store:
        from zarr.storage import FsspecStore

        scheme = self.target.partition("://")[0]
        if not read_only and scheme.lower() in _READ_ONLY_SCHEMES:
            raise ConfigError(
                f"{self} is a read-only {scheme.lower()}:// URL; write the store to a folder or an "
                "object store (s3://, gs://, ...) and share that URL for reading"
            )
        try:
            return FsspecStore.from_url(self.target, read_only=read_only)
        except ImportError as error:
            package = _BACKEND_PACKAGES.get(scheme, "the fsspec backend for it")
            raise ConfigError(
                f"{self} needs {package}, which is not installed ({error}); install it"
            ) from None

    def exists(self) -> bool:
        return not run_sync(self.zarr_store(read_only=True).is_empty(""))

    def nbytes(self) -> int | None:
        return None

    def resolved(self) -> StoreLocation:
        return self


def forget_cached_listings(store: Store) -> None:
    """Drop the listings the fsspec filesystem behind ``store`` (if any) has cached, so that the
    next reads see objects other processes wrote since: s3fs, for one, answers "no such key" from a
    listing it made before they existed, and a missing chunk reads as the fill value."""
    filesystem = getattr(store, "fs", None)
    if filesystem is not None:
        filesystem.invalidate_cache()


def _disk_nbytes(root: Path) -> int | None:
    if not root.exists():
        return None
    if root.is_file():
        return root.stat().st_size
    return sum(item.stat().st_size for item in root.rglob("*") if item.is_file())


def parse_location(location: str | os.PathLike[str] | StoreLocation) -> StoreLocation:
    """Classify a store path or URL, refusing schemes no installed fsspec backend could serve."""
    if isinstance(location, StoreLocation):
        return location
    text = os.fspath(location)
    if not text.strip():
        raise ConfigError(
            "the store path is empty; pass a folder such as teacher.zarr, a URL or a .zip"
        )
    scheme, sep, rest = text.partition("://")
    if not sep:
        path = text
    elif scheme in ("file", "local"):
        path = rest
    else:
        from fsspec.registry import known_implementations, registry

        if scheme not in known_implementations and scheme not in registry:
            raise ConfigError(
                f"unsupported store URL scheme {scheme!r} in {text!r}; a store can be "
                f"{_SUPPORTED_LOCATIONS}"
            )
        if text.lower().endswith(".zip"):
            raise ConfigError(
                f"{text} is a remote zip file; kdcache reads zip stores from local disk only: "
                "download it, or share the unpacked store at a URL instead"
            )
        return RemoteLocation(text, text)
    if not path.strip():
        raise ConfigError(f"{text!r} names no path; pass e.g. file:///data/teacher.zarr")
    path = path.rstrip("/") or "/"
    if path.lower().endswith(".zip"):
        return ZipLocation(text, path)
    return LocalLocation(text, path)


def zarr_store(location: StoreLocation, *, read_only: bool) -> Store:
    """A zarr store object for ``location``; open a new one in every process (fsspec clients and
    zip handles are not fork-safe)."""
    return location.zarr_store(read_only=read_only)


def partial_files(location: StoreLocation) -> list[Path]:
    """Temporary files a killed local writer left behind (always none for other locations)."""
    return location.partial_files()


def remove_partial_files(location: StoreLocation) -> int:
    """Delete what :func:`partial_files` finds; only call it while holding the writer lock."""
    leftovers = location.partial_files()
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def _enclosing_store(path: str | os.PathLike[str]) -> Path | None:
    """The nearest folder above ``path`` that is a Zarr node (holds ``zarr.json``), if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "zarr.json").is_file():
            return parent
    return None


def refuse_inside_store(path: str | os.PathLike[str], what: str) -> None:
    """Refuse to create ``what`` at a local ``path`` inside a Zarr store (it would damage it)."""
    store = _enclosing_store(path)
    if store is not None:
        raise ConfigError(
            f"{what} {os.fspath(path)!r} lies inside the Zarr store {store}; choose a path "
            "outside any store (kdcache never writes into another store's folders)"
        )
