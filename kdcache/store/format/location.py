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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdcache.errors import ConfigError, StoreFormatError, StoreNotFoundError
from kdcache.store.format._zarr_compat import open_zip_now, run_sync

if TYPE_CHECKING:
    from zarr.abc.store import Store

#: What :func:`parse_location` accepts, for error messages and docs.
SUPPORTED_LOCATIONS = (
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
class StoreLocation:
    """Where a store lives. ``kind`` is ``local``, ``zip`` or ``remote``; ``target`` is a
    filesystem path (local, zip) or a URL (remote); ``text`` is what the user wrote."""

    text: str
    kind: str
    target: str

    def __str__(self) -> str:
        return self.text


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
                f"{SUPPORTED_LOCATIONS}"
            )
        if text.lower().endswith(".zip"):
            raise ConfigError(
                f"{text} is a remote zip file; kdcache reads zip stores from local disk only: "
                "download it, or share the unpacked store at a URL instead"
            )
        return StoreLocation(text, "remote", text)
    if not path.strip():
        raise ConfigError(f"{text!r} names no path; pass e.g. file:///data/teacher.zarr")
    path = path.rstrip("/") or "/"
    kind = "zip" if path.lower().endswith(".zip") else "local"
    return StoreLocation(text, kind, path)


def zarr_store(location: StoreLocation, *, read_only: bool) -> Store:
    """A zarr store object for ``location``; open a new one in every process (fsspec clients and
    zip handles are not fork-safe)."""
    from zarr.storage import FsspecStore, LocalStore, ZipStore

    if location.kind == "zip":
        if not read_only:
            raise ConfigError(
                f"{location} is a zip file, and zip stores are read-only; write the store into a "
                "folder, then pack it with `kdcache pack STORE OUT.zip`"
            )
        if not Path(location.target).is_file():
            raise StoreNotFoundError(
                f"no store at {location}; check the path or run `kdcache pack`"
            )
        if not zipfile.is_zipfile(location.target):
            raise StoreFormatError(
                f"{location} is not a zip file kdcache can read; pass a zip written by `kdcache "
                "pack`"
            )
        try:
            store = ZipStore(location.target, mode="r")
            open_zip_now(store)  # a damaged central directory fails here, not at the first read
        except (*ZIP_ERRORS, OSError, ValueError) as error:
            raise StoreFormatError(
                f"{location} is a damaged zip file ({error}); pack the store again"
            ) from None
        return store
    if location.kind == "local":
        return LocalStore(location.target, read_only=read_only)
    scheme = location.target.partition("://")[0].lower()
    if not read_only and scheme in _READ_ONLY_SCHEMES:
        raise ConfigError(
            f"{location} is a read-only {scheme}:// URL; write the store to a folder or an object "
            "store (s3://, gs://, ...) and share that URL for reading"
        )
    try:
        return FsspecStore.from_url(location.target, read_only=read_only)
    except ImportError as error:
        scheme = location.target.partition("://")[0]
        package = _BACKEND_PACKAGES.get(scheme, "the fsspec backend for it")
        raise ConfigError(
            f"{location} needs {package}, which is not installed ({error}); install it"
        ) from None


def location_exists(location: StoreLocation) -> bool:
    """Whether anything at all is stored at ``location``."""
    if location.kind != "remote":
        return Path(location.target).exists()
    return not run_sync(zarr_store(location, read_only=True).is_empty(""))


def location_is_empty(location: StoreLocation) -> bool:
    """Whether nothing is stored at ``location`` (missing, or an empty folder or prefix)."""
    if location.kind == "local":
        root = Path(location.target)
        return not root.exists() or (root.is_dir() and not any(root.iterdir()))
    return not location_exists(location)


def partial_files(location: StoreLocation) -> list[Path]:
    """Temporary files a killed local writer left behind (always none for other locations)."""
    root = Path(location.target)
    if location.kind != "local" or not root.is_dir():
        return []
    return sorted(path for path in root.rglob("*.partial") if _PARTIAL_FILE.search(path.name))


def remove_partial_files(location: StoreLocation) -> int:
    """Delete what :func:`partial_files` finds; only call it while holding the writer lock."""
    leftovers = partial_files(location)
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def location_nbytes(location: StoreLocation) -> int | None:
    """Bytes a local store or zip occupies on disk; ``None`` for a remote store."""
    root = Path(location.target)
    if location.kind == "remote" or not root.exists():
        return None
    if root.is_file():
        return root.stat().st_size
    return sum(item.stat().st_size for item in root.rglob("*") if item.is_file())


def resolved_local(location: StoreLocation) -> StoreLocation:
    """``location`` with its local path made absolute and free of links and ``.`` parts.

    Writers key their lock and staging folder by this path, so ``alias.zarr`` (a link to the
    store) or ``store.zarr/.`` name the same store as ``store.zarr``.
    """
    if location.kind == "remote":
        return location
    return StoreLocation(location.text, location.kind, str(Path(location.target).resolve()))


def enclosing_store(path: str | os.PathLike[str]) -> Path | None:
    """The nearest folder above ``path`` that is a Zarr node (holds ``zarr.json``), if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "zarr.json").is_file():
            return parent
    return None


def refuse_inside_store(path: str | os.PathLike[str], what: str) -> None:
    """Refuse to create ``what`` at a local ``path`` inside a Zarr store (it would damage it)."""
    store = enclosing_store(path)
    if store is not None:
        raise ConfigError(
            f"{what} {os.fspath(path)!r} lies inside the Zarr store {store}; choose a path "
            "outside any store (kdcache never writes into another store's folders)"
        )
