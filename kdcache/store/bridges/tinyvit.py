"""TinyViT's saved teacher logits (microsoft/Cream, TinyViT/) into a kdcache image store.

The format, as TinyViT's code writes and reads it:

- ``TinyViT/save_logits.py`` runs the teacher on each augmented image and keeps, per image,
  ``softmax(outputs).topk(k)``: probabilities at T = 1 as float16 and class ids as int16;
- ``TinyViT/data/augmentation/dataset_wrapper.py`` (``DatasetWrapper``) writes per image the
  bytes ``int32 seed + k int16 ids + k float16 probabilities`` (4 + 4k bytes) under a text key,
  the dataset's ``get_keys()`` or ``str(index)``; the seed drives every random choice of the
  image's augmentation (``AugRandomContext``), mixup/cutmix included;
- ``TinyViT/data/augmentation/manager.py`` (``TxtManager``) stores one epoch in a folder
  ``logits_top{k}_epoch{e}`` as ``rank{r}-keys.txt`` (one key per line) and
  ``rank{r}-values.bin`` (the records in the same order), one pair per training rank; a key
  already written by a rank is skipped.

One epoch becomes one store of one row per image (keyed by sample index: an integer key is the
index, other keys are looked up in a list of the dataset's keys). Each image's seed is kept in the
array ``tinyvit_seed``; kdcache cannot replay TinyViT's augmentation from it, so the rows are the
teacher's view of an image kdcache never shows a student (see docs/merging.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError
from kdcache.store.bridges.topk import (
    IMPORTED_FROM_KEY,
    batched,
    default_encoding,
    dense_from_top_k,
    refuse_existing,
    required,
    write_new_store,
)
from kdcache.store.format.layout import StoreLike, row_ranges
from kdcache.store.format.location import parse_location

__all__ = [
    "SEED_ARRAY",
    "ImportResult",
    "import_tinyvit",
]

_EPOCH_FOLDER = re.compile(r"logits_top(?P<k>\d+)_epoch(?P<epoch>\d+)$")
_RANK_FILES = re.compile(r"^rank(?P<rank>\d+)-values\.bin$")
#: The array of an imported store holding each image's augmentation seed.
SEED_ARRAY = "tinyvit_seed"


@dataclass(frozen=True)
class ImportResult:
    out: str
    num_samples: int
    num_classes: int
    k: int
    encoding: str


def _read_epoch(folder: Path, k: int) -> tuple[list[str], np.ndarray]:
    """Every (key, record) of one epoch folder, ranks in order, a key's first record kept."""
    files = sorted(
        (int(match["rank"]), path)
        for path in folder.iterdir()
        if (match := _RANK_FILES.match(path.name))
    )
    if not files:
        raise DatasetNotFoundError(
            f"{folder} holds no rank{{r}}-values.bin files; pass a TinyViT "
            "logits_top{k}_epoch{e} folder"
        )
    size = 4 + 4 * k
    keys: list[str] = []
    records = []
    seen: set[str] = set()
    for rank, values_path in files:
        keys_path = folder / f"rank{rank}-keys.txt"
        try:
            names = [line.strip() for line in keys_path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{values_path} has no {keys_path.name} beside it") from None
        raw = np.fromfile(values_path, dtype=np.uint8)
        if raw.size != size * len(names):
            raise SpecError(
                f"{values_path} holds {raw.size} bytes for {len(names)} keys, not {size} bytes "
                f"each (4 + 4 * {k}); pass --top-k with the k it was saved with"
            )
        for number, name in enumerate(names):
            if name not in seen:  # as TinyViT's reader: the first rank holding a key wins
                seen.add(name)
                keys.append(name)
                records.append(raw[number * size : (number + 1) * size])
    return keys, np.stack(records)


def import_tinyvit(
    source: str | Path,
    out: StoreLike,
    *,
    num_classes: int | None,
    top_k: int | None = None,
    keys: Sequence[str] | None = None,
    num_samples: int | None = None,
    encoding: str | None = None,
    teacher: str | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ImportResult:
    """Import one epoch of TinyViT logits (a ``logits_top{k}_epoch{e}`` folder) as a store.

    ``keys`` are the dataset's keys in sample order (its ``get_keys()``); without them every key
    must be an integer sample index. ``num_samples`` [default: len(keys), or the largest index
    + 1]; a sample without a record is refused, naming the indices."""
    num_classes = required(
        num_classes, "--num-classes", "the teacher's classes (TinyViT's files do not say)"
    )
    refuse_existing(out, overwrite)
    folder = Path(source)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no TinyViT logits folder at {folder}")
    match = _EPOCH_FOLDER.search(folder.name)
    k = top_k if top_k is not None else (int(match["k"]) if match else None)
    if k is None:
        raise ConfigError(
            f"{folder.name} does not say its k (logits_top{{k}}_epoch{{e}}); pass --top-k"
        )
    names, records = _read_epoch(folder, k)
    indices = _sample_indices(names, keys)
    count = (
        num_samples
        if num_samples is not None
        else (len(keys) if keys is not None else int(indices.max()) + 1)
    )
    outside = np.flatnonzero(indices >= count)
    if outside.size:
        raise ConfigError(
            f"keys {[names[i] for i in outside[:3]]} name samples beyond the {count} samples; "
            "pass --num-samples with the dataset's size"
        )
    missing = np.setdiff1d(np.arange(count), indices)
    if missing.size:
        raise SpecError(
            f"{folder} holds no logits for samples {row_ranges(missing)}; every sample of the "
            "epoch must be there (or pass --num-samples)"
        )
    seeds = records[:, :4].copy().view("<i4")[:, 0]
    classes = records[:, 4 : 4 + 2 * k].copy().view("<i2").astype(np.int64)
    probabilities = records[:, 4 + 2 * k :].copy().view("<f2").astype(np.float64)
    order = np.argsort(indices)
    seed_array = np.zeros(count, dtype=np.int64)
    seed_array[indices] = seeds
    chosen = encoding or default_encoding(k, num_classes)

    def rows() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for part in batched(count):
            taken = order[part]
            with np.errstate(divide="ignore"):
                log_probs = np.log(probabilities[taken])
            dense = dense_from_top_k(
                log_probs,
                classes[taken],
                num_classes,
                kept=probabilities[taken] > 0,
                where=str(folder),
            )
            yield indices[taken], dense

    write_new_store(
        out,
        rows(),
        overwrite=overwrite,
        num_samples=count,
        num_classes=num_classes,
        encoding=chosen,
        chunk_rows=chunk_rows,
        teacher=None if teacher is None else {"spec": teacher, "weights_sha256": None},
        dataset={"spec": f"tinyvit:{folder.resolve()}", "split": None, "fingerprint": None},
        extra={
            IMPORTED_FROM_KEY: {
                "format": "tinyvit",
                "source": str(folder.resolve()),
                "epoch": int(match["epoch"]) if match else None,
                "records_sha256": hashlib.sha256(records.tobytes()).hexdigest(),
                "kept_per_sample": k,
                "temperature": 1.0,
                "missing_mass": "spread evenly over the classes outside the top-k",
                "views": f"TinyViT's augmentation from {SEED_ARRAY}; not replayable by kdcache",
            }
        },
        fsync=fsync,
        arrays={SEED_ARRAY: seed_array},
    )
    return ImportResult(
        out=parse_location(out).text,
        num_samples=count,
        num_classes=num_classes,
        k=k,
        encoding=chosen,
    )


def _sample_indices(names: list[str], keys: Sequence[str] | None) -> np.ndarray:
    if keys is None:
        bad = [name for name in names if not name.isdigit()]
        if bad:
            raise ConfigError(
                f"TinyViT keys such as {bad[0]!r} are not sample indices; pass --keys FILE with "
                "the dataset's keys in sample order, one per line"
            )
        return np.array([int(name) for name in names], dtype=np.int64)
    position = {key: number for number, key in enumerate(keys)}
    unknown = [name for name in names if name not in position]
    if unknown:
        raise ConfigError(
            f"{len(unknown)} TinyViT keys (e.g. {unknown[0]!r}) are not in the keys list; pass the "
            "dataset's keys the logits were saved with"
        )
    return np.array([position[name] for name in names], dtype=np.int64)
