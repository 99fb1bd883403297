"""What a store holds and how good it is: the report behind ``kdcache inspect``.

:func:`inspect_store` opens any store (complete or not), reads its metadata and sizes, and, for
a complete store, runs once over its rows for the teacher's accuracy against the stored labels
and its mean entropy at T = 1 and 4. Fidelity is not recomputed: the true logits are gone, so
the report shows what the writer measured (kdcache.logits.fidelity).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.store.format.layout import SEQUENCE_KEY, store_nbytes
from kdcache.store.read.reader import (
    JoinedReader,
    StoreReader,
    open_store,
    recorded_class_names,
)

__all__ = [
    "StoreReport",
    "format_report",
    "inspect_store",
    "teacher_statistics",
]

#: Temperatures at which the report gives the teacher's mean entropy.
_ENTROPY_TEMPERATURES = (1.0, 4.0)
#: Rows decoded at a time, so that a dense (block, C) tensor stays small.
_BLOCK_ROWS = 4096


@dataclass(frozen=True, kw_only=True)
class StoreReport:
    """Identity, size and quality of one store; ``None`` marks what cannot be known.

    ``bytes_on_disk`` is ``None`` for a remote store; ``teacher_accuracy`` (percent) needs stored
    labels; accuracy and entropies (nats, keyed by the temperature as text) need a complete store;
    ``fidelity`` is absent from stores written before kdcache recorded it. A token-level store of
    a language model (``sequence`` set: ``num_sequences``, ``num_tokens``, ``max_length``) holds
    one row per next-token position: its samples are tokens, its classes the vocabulary, and its
    accuracy is the teacher's next-token accuracy.
    """

    path: str
    format_version: int
    kdcache_version: str
    created_at: str
    num_samples: int
    num_classes: int
    encoding: str
    chunk_rows: int
    teacher: dict[str, Any] | None
    dataset: dict[str, Any] | None
    complete: bool
    written_fraction: float
    bytes_on_disk: int | None
    bytes_per_sample: float | None
    compression_ratio: float | None
    teacher_accuracy: float | None
    mean_entropy: dict[str, float] | None
    fidelity: dict[str, Any] | None
    #: V, views stored per sample; ``augment`` records their recipe, seed and parameter fields.
    views: int = 1
    augment: dict[str, Any] | None = None
    bytes_per_view: float | None = None
    sequence: dict[str, int] | None = None
    #: A joined store's parts, read in place: each one's ``store`` (path or URL),
    #: ``num_samples`` and ``bytes_on_disk``; ``None`` for a store of its own rows.
    parts: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def teacher_statistics(reader: StoreReader) -> tuple[float | None, dict[str, float]]:
    """Accuracy (percent, ``None`` without labels) and mean entropy at each of
    :data:`_ENTROPY_TEMPERATURES` of the teacher a complete store holds, over every row (every
    view; a mixed view counts against its own sample's label)."""
    labels = reader.labels
    correct = 0
    entropy_sums = dict.fromkeys(_ENTROPY_TEMPERATURES, 0.0)
    num_rows = reader.metadata.num_rows
    for start in range(0, num_rows, _BLOCK_ROWS):
        rows = np.arange(start, min(start + _BLOCK_ROWS, num_rows))
        if reader.encoding.is_sparse:
            sparse = reader.read_sparse(rows)
            predicted = sparse.indices[:, 0]
            for temperature in _ENTROPY_TEMPERATURES:
                entropy_sums[temperature] += sparse.entropy(temperature).double().sum().item()
        else:
            logits = reader.read_dense(rows).double()
            predicted = logits.argmax(dim=1)
            for temperature in _ENTROPY_TEMPERATURES:
                log_p = torch.log_softmax(logits / temperature, dim=1)
                entropy_sums[temperature] -= (
                    torch.special.xlogy(log_p.exp(), log_p.exp()).sum().item()
                )
        if labels is not None:
            correct += int((predicted.numpy() == labels[rows // reader.views]).sum())
    accuracy = None if labels is None else 100.0 * correct / num_rows
    return accuracy, {str(t): total / num_rows for t, total in entropy_sums.items()}


def inspect_store(path: str | os.PathLike[str]) -> StoreReport:
    """The :class:`StoreReport` of the store at ``path`` (a complete or interrupted one)."""
    reader = open_store(path, allow_incomplete=True)
    meta = reader.metadata
    nbytes = store_nbytes(path)
    parts = None
    if isinstance(reader, JoinedReader):
        sizes = [store_nbytes(part.where) for part in reader.parts]
        parts = [
            {"store": part.where, "num_samples": part.num_samples, "bytes_on_disk": size}
            for part, size in zip(reader.parts, sizes, strict=True)
        ]
        known = [size for size in sizes if size is not None]
        # the parts' rows and the joined record; unknown once a part is remote
        nbytes = None if nbytes is None or len(known) < len(sizes) else nbytes + sum(known)
    accuracy, entropy = teacher_statistics(reader) if meta.complete else (None, None)
    raw_float32 = meta.num_rows * meta.num_classes * 4
    return StoreReport(
        path=reader.where,
        format_version=meta.format_version,
        kdcache_version=meta.kdcache_version,
        created_at=meta.created_at,
        num_samples=meta.num_samples,
        num_classes=meta.num_classes,
        encoding=meta.encoding,
        chunk_rows=meta.chunk_rows,
        teacher=meta.teacher,
        dataset=meta.dataset,
        complete=meta.complete,
        written_fraction=reader.written_fraction(),
        bytes_on_disk=nbytes,
        bytes_per_sample=None if nbytes is None else nbytes / meta.num_samples,
        compression_ratio=None if not nbytes else raw_float32 / nbytes,
        teacher_accuracy=accuracy,
        mean_entropy=entropy,
        fidelity=meta.fidelity,
        views=meta.views,
        augment=meta.augment,
        bytes_per_view=None if nbytes is None else nbytes / meta.num_rows,
        sequence=meta.extra.get(SEQUENCE_KEY),
        parts=parts,
    )


def _identity(record: dict[str, Any] | None, *keys: str) -> str:
    if not record:
        return "not recorded"
    parts = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and len(value) == 64:  # a sha256: its prefix identifies it
            value = value[:12] + "…"
        if value is not None:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "not recorded"


def _views(report: StoreReport) -> str:
    if not report.augment:
        return f"{report.views} (clean inputs)" if report.views == 1 else str(report.views)
    augment = report.augment
    return (
        f"{report.views}, recipe {augment.get('recipe')!r} seed {augment.get('seed')} "
        f"({len(augment.get('fields') or ())} parameters per view, drawn by "
        f"{augment.get('sampler') or 'an older generator (numpy-default_rng)'})"
    )


def _number(value: float | None, unit: str = "", digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}{unit}"


def _accuracy(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}%"


def _class_names(report: StoreReport, shown: int = 10) -> str:
    names = recorded_class_names(report.dataset, report.num_classes)
    if names is None:
        return ""
    more = f", … ({len(names) - shown} more)" if len(names) > shown else ""
    return f" ({', '.join(f'{i}={name}' for i, name in enumerate(names[:shown]))}{more})"


def format_report(report: StoreReport) -> str:
    """The report as aligned ``name: value`` lines for a terminal."""
    fingerprint = (report.dataset or {}).get("fingerprint") or {}
    sequence = report.sequence
    lines = [
        ("store", report.path),
        ("format version", str(report.format_version)),
        ("written by", f"kdcache {report.kdcache_version or '?'} at {report.created_at or '?'}"),
    ]
    if sequence is None:
        row = "sample"
        lines += [
            ("samples (N)", f"{report.num_samples:,}"),
            ("views (V)", _views(report)),
            ("classes (C)", f"{report.num_classes:,}" + _class_names(report)),
        ]
    else:
        row = "token"
        lines += [
            (
                "sequences",
                f"{sequence['num_sequences']:,} (up to {sequence['max_length']:,} tokens each)",
            ),
            ("tokens (N)", f"{report.num_samples:,} (next-token rows)"),
            ("vocabulary (C)", f"{report.num_classes:,}"),
        ]
    lines += [
        (
            "encoding",
            f"{report.encoding} ({report.chunk_rows:,} {'rows' if sequence is None else 'tokens'} "
            "per chunk)",
        ),
        ("teacher", _identity(report.teacher, "spec", "weights_sha256")),
        (
            "dataset",
            _identity(report.dataset, "spec", "split")
            + (
                f", labels_sha256={fingerprint['labels_sha256'][:12]}…"
                if "labels_sha256" in fingerprint
                else ""
            ),
        ),
        (
            "complete",
            "yes" if report.complete else f"no ({report.written_fraction:.0%} of chunks written)",
        ),
    ]
    for number, part in enumerate(report.parts or ()):
        size = part["bytes_on_disk"]
        lines.append(
            (
                f"part {number}",
                f"{part['store']} ({part['num_samples']:,} samples, "
                + ("remote)" if size is None else f"{size:,} bytes)"),
            )
        )
    if report.bytes_on_disk is None:
        lines.append(("bytes on disk", "unknown (remote store)"))
    else:
        lines += [
            (
                "bytes on disk",
                f"{report.bytes_on_disk:,} ({report.bytes_per_sample:,.1f} B/{row}"
                + (f", {report.bytes_per_view:,.1f} B/view)" if report.views > 1 else ")"),
            ),
            ("compression", f"{_number(report.compression_ratio, 'x', 3)} vs raw float32"),
        ]
    if sequence is None:
        lines.append(("teacher accuracy", f"{_accuracy(report.teacher_accuracy)} vs stored labels"))
    else:
        lines.append(
            (
                "teacher accuracy",
                f"{_accuracy(report.teacher_accuracy)} of next tokens predicted (top-1)",
            )
        )
    entropy = report.mean_entropy or {}
    lines.append(
        (
            "mean entropy",
            ", ".join(f"T={float(t):g}: {h:.4f} nats" for t, h in entropy.items()) or "n/a",
        )
    )
    fidelity = report.fidelity
    if fidelity:
        kls = ", ".join(
            f"T={t:g}: {kl:.3g}"
            for t, kl in zip(fidelity["temperatures"], fidelity["mean_kl"], strict=False)
        )
        lines += [
            ("fidelity KL", f"{kls} (mean over {fidelity['num_samples']:,} rows)"),
            ("top-1 agreement", f"{100 * fidelity['top1_agreement']:.2f}%"),
        ]
    else:
        lines.append(("fidelity", "not recorded"))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in lines)
