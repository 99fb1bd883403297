"""Each array's zarr metadata, pinned in the kdcache record when the store is created.

zarr trusts every array's own ``zarr.json``: edit its ``data_type`` or add a ``transpose`` codec
and zarr decodes the same bytes into other numbers, with valid checksums. kdcache records the
parts of each array's metadata that decide how bytes become values (shape, chunk grid, data
type, codecs, fill value, chunk keys) in ``arrays`` of its own record, and every reader compares
them before decoding anything. Stores written before the record existed are checked against
what their encoding implies and the codecs kdcache has always written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "array_problems",
    "array_spec",
]

#: The parts of an array's zarr metadata that decide how its bytes decode into values.
_PINNED_KEYS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs", "fill_value")
#: Codecs kdcache writes; a store without pinned arrays may use no others.
_KNOWN_CODECS = ("bytes", "zstd", "crc32c")


def array_spec(array: Any) -> dict[str, Any]:
    """The pinned parts of ``array``'s metadata, as JSON-ready values."""
    metadata = array.metadata.to_dict()
    return {key: _plain(metadata.get(key)) for key in _PINNED_KEYS}


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, numpy scalars plain)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def array_problems(
    array: Any,
    *,
    pinned: dict[str, Any] | None,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: tuple[int, ...],
) -> list[str]:
    """How ``array`` departs from its pinned metadata (or, unpinned, from what it must be)."""
    found = []
    if tuple(array.shape) != shape:
        found.append(f"shape {tuple(array.shape)} (the store needs {shape})")
    if array.dtype != dtype:
        found.append(f"dtype {array.dtype} (the store needs {dtype})")
    if tuple(array.chunks) != chunks:
        found.append(f"chunks {tuple(array.chunks)} (the store needs {chunks})")
    actual = array_spec(array)
    if pinned is not None:
        changed = [key for key in _PINNED_KEYS if actual.get(key) != pinned.get(key)]
        if changed and not found:
            key = changed[0]
            found.append(
                f"edited {key} in its zarr.json ({_short(actual.get(key))}, recorded "
                f"{_short(pinned.get(key))})"
            )
        return found
    for codec in actual["codecs"] or []:
        name = codec.get("name") if isinstance(codec, dict) else codec
        if name not in _KNOWN_CODECS:
            found.append(f"codec {name!r}, which kdcache never writes")
        elif name == "bytes" and (codec.get("configuration") or {}).get("endian") == "big":
            found.append("big-endian bytes, which kdcache never writes")
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
