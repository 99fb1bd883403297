"""One schema for the ``kdcache`` metadata record, checked whenever a store is opened.

A store's metadata is plain JSON that anyone can edit; nothing read from it reaches the rest of
kdcache before :func:`validate_record` has checked every field's type and range and their
consistency (the encoding must fit the class count, a fidelity record must have matching
lengths, ...). A failure is a :class:`~kdcache.errors.StoreFormatError` naming the field, what
it holds and what is expected, so every command reports a damaged store in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kdcache.choices import MAX_VIEWS
from kdcache.errors import KdcacheError, StoreFormatError
from kdcache.logits.encodings import parse_encoding
from kdcache.store.format.digests import DIGEST_BYTES, DIGESTS_ARRAY, record_digest

__all__ = [
    "MAX_CLASSES",
    "MAX_SAMPLES",
    "check_record_digest",
    "validate_record",
]

#: Upper bounds that keep arithmetic on N, C and R far from overflowing int64.
MAX_SAMPLES = 1 << 40
MAX_CLASSES = 1 << 31
_MAX_CHUNK_ROWS = 1 << 31
#: Largest input side (pixels) a view record may be drawn for.
_MAX_SIDE = 1 << 20


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


class _Checker:
    """Collects the first problem of a record, phrased for one line."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, value: Any, expected: str) -> StoreFormatError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return StoreFormatError(
            f"{self.where} has damaged metadata: kdcache.{field} is {shown}, expected {expected}; "
            "restore the store's zarr.json from a good copy or dump the store again"
        )

    def require(self, ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            raise self.fail(field, value, expected)

    def integer(self, record: dict[str, Any], field: str, low: int, high: int) -> int:
        value = record.get(field)
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise self.fail(field, value, f"an integer from {low} to {high:,}")
        return value

    def mapping(
        self, record: dict[str, Any], field: str, fields: dict[str, Callable[[Any], bool]]
    ) -> None:
        """``record[field]`` is null or an object whose listed keys, if present, pass their test."""
        value = record.get(field)
        if value is None:
            return
        self.require(isinstance(value, dict), field, value, "an object or null")
        for key, test in fields.items():
            if key in value:
                self.require(test(value[key]), f"{field}.{key}", value[key], _EXPECTED[test])


_EXPECTED: dict[Callable[[Any], bool], str] = {
    _optional_str: "a string or null",
    _is_int: "an integer",
}


def _optional_int(value: Any) -> bool:
    return value is None or _is_int(value)


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _size(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_int(side) and 1 <= side <= _MAX_SIDE for side in value)
    )


_EXPECTED[_optional_int] = "an integer or null"
_EXPECTED[_size] = "[HEIGHT, WIDTH], two integers >= 1"
_EXPECTED[_string_list] = "a list of strings"


def _fingerprint(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    counts = all(_is_int(value[key]) for key in ("num_samples", "num_classes") if key in value)
    hashes = all(
        isinstance(value[key], str) for key in ("labels_sha256", "inputs_sha256") if key in value
    )
    indices = value.get("input_indices")
    return (
        counts
        and hashes
        and (indices is None or (isinstance(indices, list) and all(map(_is_int, indices))))
    )


_EXPECTED[_fingerprint] = (
    "null or an object with integer num_samples/num_classes, string sha256 fields and a list "
    "of integer input_indices"
)


def _check_fidelity(check: _Checker, value: Any) -> None:
    if value is None:
        return
    expected = (
        "null or an object with equal-length lists temperatures and mean_kl of numbers, a number "
        "top1_agreement and an integer num_samples"
    )
    ok = (
        isinstance(value, dict)
        and isinstance(value.get("temperatures"), list)
        and isinstance(value.get("mean_kl"), list)
        and len(value["temperatures"]) == len(value["mean_kl"])
        and all(_is_number(t) and t > 0 for t in value["temperatures"])
        and all(_is_number(kl) for kl in value["mean_kl"])
        and _is_number(value.get("top1_agreement"))
        and _is_int(value.get("num_samples"))
    )
    check.require(ok, "fidelity", value, expected)


def _hex(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 2 * DIGEST_BYTES
        and all(c in "0123456789abcdef" for c in value)
    )


def _check_integrity(check: _Checker, record: dict[str, Any], layout: dict[str, Any]) -> None:
    """The fields that bind chunks and arrays to the store: generation, pinned arrays, digests;
    and the no-downgrade rule (a store carrying any field of a format that records digests
    must carry the digests that format records)."""
    generation = record.get("generation", "")
    check.require(
        isinstance(generation, str) and len(generation) <= 64,
        "generation",
        generation,
        "a hex string (absent in older stores)",
    )
    arrays = record.get("arrays")
    if arrays is not None:
        check.require(
            isinstance(arrays, dict)
            and all(isinstance(spec, dict) for spec in arrays.values())
            and set(layout) <= arrays.keys(),
            "arrays",
            arrays,
            f"an object pinning at least the arrays {sorted(layout)}",
        )
    digests = record.get("digests")
    augment = record.get("augment")
    newer = [
        field
        for field, present in (
            ("generation", bool(generation)),
            ("arrays", arrays is not None),
            ("augment.sampler", isinstance(augment, dict) and "sampler" in augment),
        )
        if present
    ]
    if digests is None:
        if newer:
            raise _downgraded(check, f"it carries {newer[0]} but no digests")
        return
    check.require(
        isinstance(digests, dict)
        and isinstance(digests.get("algorithm"), str)
        and digests.get("arrays") == list(layout),
        "digests",
        digests,
        f"an object with a string algorithm and arrays equal to {list(layout)}",
    )
    whole, bound = digests.get("whole"), digests.get("record")
    if whole is None and bound is None:
        return  # written before whole arrays and the record were digested
    if whole is None or bound is None:
        present, missing = ("record", "whole") if whole is None else ("whole", "record")
        raise _downgraded(check, f"it records digests.{present} but not digests.{missing}")
    check.require(
        isinstance(whole, dict) and all(map(_hex, whole.values())),
        "digests.whole",
        whole,
        "an object of 32-digit hex digests",
    )
    check.require(_hex(bound), "digests.record", bound, "a 32-digit hex digest")
    if arrays is None:
        raise _downgraded(check, "it records digests.whole but no pinned arrays")
    # Every array written once with the store (all pinned ones but the row arrays and the
    # digest table) has its digest: a new kind of array is covered without naming it here.
    unrowed = set(arrays) - set(layout) - {DIGESTS_ARRAY}
    check.require(
        set(whole) == unrowed,
        "digests.whole",
        sorted(whole),
        f"a digest for each of the arrays {sorted(unrowed)}",
    )


def _downgraded(check: _Checker, what: str) -> StoreFormatError:
    return StoreFormatError(
        f"{check.where} lacks integrity data its format records ({what}): its digests were "
        "deleted or the store was damaged; restore it from a good copy or dump it again"
    )


def check_record_digest(record: dict[str, Any], *, where: str) -> None:
    """Refuse a record whose bound fields no longer match its ``digests.record`` (edited after
    the store was written); ``record`` has every field of StoreMetadata (defaults filled in)."""
    recorded = (record.get("digests") or {}).get("record")
    if recorded is not None and record_digest(record) != recorded:
        raise StoreFormatError(
            f"{where} has metadata edited since it was written: its record no longer matches "
            "digests.record (a changed recipe, seed, sampler, input size, layout, teacher or "
            "dataset field would make the stored arrays lie); restore the store's zarr.json from "
            "a good copy or dump the store again"
        )


def validate_record(record: Any, *, where: str, format_version: int) -> dict[str, Any]:
    """``record`` checked against the schema; returns it unchanged, or raises StoreFormatError."""
    check = _Checker(where)
    check.require(isinstance(record, dict), "(record)", record, "a JSON object")
    version = record.get("format_version")
    check.require(_is_int(version), "format_version", version, "an integer")
    if version > format_version:
        raise StoreFormatError(
            f"{where} uses store format version {version}, newer than the {format_version} "
            "this kdcache reads; upgrade kdcache (pip install -U kdcache)"
        )
    check.integer(record, "format_version", 1, format_version)
    check.integer(record, "num_samples", 1, MAX_SAMPLES)
    num_classes = check.integer(record, "num_classes", 1, MAX_CLASSES)
    check.integer(record, "chunk_rows", 1, _MAX_CHUNK_ROWS)
    views = record.get("views", 1)
    check.require(
        _is_int(views) and 1 <= views <= MAX_VIEWS,
        "views",
        views,
        f"an integer from 1 to {MAX_VIEWS:,}",
    )
    check.mapping(
        record,
        "augment",
        {
            "recipe": _optional_str,
            "seed": _optional_int,
            "sampler": _optional_str,
            "fields": _string_list,
            "input_size": _size,
            "ops_version": _is_int,
        },
    )
    encoding = record.get("encoding")
    check.require(isinstance(encoding, str), "encoding", encoding, "an encoding name string")
    try:
        layout = parse_encoding(encoding, num_classes=num_classes).layout(num_classes)
    except KdcacheError as error:
        raise check.fail(
            "encoding", encoding, f"an encoding that fits the store ({error})"
        ) from None
    check.require(
        isinstance(record.get("complete", False), bool),
        "complete",
        record.get("complete"),
        "true or false",
    )
    for field in ("kdcache_version", "created_at"):
        check.require(isinstance(record.get(field, ""), str), field, record.get(field), "a string")
    check.mapping(record, "teacher", {"spec": _optional_str, "weights_sha256": _optional_str})
    check.mapping(
        record,
        "dataset",
        {
            "spec": _optional_str,
            "split": _optional_str,
            "transform": _optional_str,
            "fingerprint": _fingerprint,
        },
    )
    _check_fidelity(check, record.get("fidelity"))
    check.require(
        isinstance(record.get("extra", {}), dict), "extra", record.get("extra"), "an object"
    )
    _check_integrity(check, record, layout)
    return record
