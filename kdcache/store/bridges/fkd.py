"""FKD's soft-label files (Shen & Xing, ECCV 2022; szq0214/FKD) into a kdcache store with views.

The format, as FKD's generator writes it (``FKD_SLG/generate_soft_label.py``, transforms in
``FKD_SLG/utils.py``):

- one file per training image, ``SAVE_PATH/<the image path's last three folders>/<stem>.tar``
  (e.g. ``imagenet/train/n01440764/n01440764_10026.tar``), written by ``torch.save`` of the list
  ``[coords, flip_status, output]`` for the image's N random crops (``--num_crops``, 500);
- ``coords`` (N, 4) float32: each RandomResizedCrop box as fractions of the image,
  ``(top / H, left / W, height / H, width / W)`` (``RandomResizedCropWithCoords``);
- ``flip_status`` (N,) bool: whether the crop was flipped (``RandomHorizontalFlipWithRes``);
- ``output`` (N, 2, k) float32 (``label_quantization``, ``marginal_smoothing_k5``/``_k10`` and
  ``marginal_renorm_k5``): row 0 the k class ids, row 1 their softmax probabilities at T = 1.
  The ``hard`` and ``smoothing`` types keep one class and no distribution: refused.

Samples are the files in sorted path order, which is torchvision's ImageFolder order (classes, then
files, sorted) unless two file names sort differently once their extensions are dropped; each
image's label is its class folder's rank among the class folders present, which must then be all the
teacher's classes, or its place in a given list of class folders. Every crop becomes one view: the
store has V = N views per sample, recorded as kdcache's ``rrc+flip`` views of inputs of a given
square size S (kdcache's dataset inputs): each box, a fraction of the image, becomes the pixel box
``round(fraction * S)`` of that input, so ``distill`` replays FKD's crops (the same region of the
image when kdcache's inputs are the whole image resized to S; to within half a pixel). The views'
generator is recorded as ``fkd``: they are replayed, never drawn again. The files are pickles: they
are loaded with ``torch.load(weights_only=True)`` allowing numpy arrays only (no code runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError
from kdcache.store.bridges.topk import (
    IMPORTED_FROM_KEY,
    default_encoding,
    dense_from_top_k,
    refuse_existing,
    required,
    write_new_store,
)
from kdcache.store.format.layout import StoreLike
from kdcache.store.format.location import parse_location

__all__ = [
    "FIELDS",
    "RECIPE",
    "ImportResult",
    "import_fkd",
]

#: FKD's crops as a kdcache recipe (kdcache.augment.recipe's canonical spec): torchvision's
#: RandomResizedCrop at FKD's default scale range, then a horizontal flip.
RECIPE = "rrc:scale=0.08-0.936,ratio=0.75-1.3333333+flip"
FIELDS = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]
#: The generator recorded for the views: FKD's, not kdcache's (they are never redrawn).
_SAMPLER = "fkd"


def _pixel_boxes(fractions: np.ndarray, size: int) -> np.ndarray:
    """FKD's boxes ``(top, left, height, width)`` as fractions of the image, (N, 4), as integer
    pixel boxes inside a ``size`` x ``size`` input."""
    height = np.clip(np.rint(fractions[:, 2] * size), 1, size)
    width = np.clip(np.rint(fractions[:, 3] * size), 1, size)
    top = np.clip(np.rint(fractions[:, 0] * size), 0, size - height)
    left = np.clip(np.rint(fractions[:, 1] * size), 0, size - width)
    return np.stack([top, left, height, width], axis=1).astype(np.float32)


def _class_folders(
    folder: Path, paths: list[Path], num_classes: int, classes: Sequence[str] | None
) -> list[str]:
    """The class folder names in label order: ``classes``, or those present, sorted."""
    present = sorted({path.parent.name for path in paths})
    if classes is None:
        if len(present) != num_classes:
            raise ConfigError(
                f"{folder} holds images of {len(present)} class folders but --num-classes is "
                f"{num_classes}; a label is its folder's rank, so a missing folder would shift "
                "every later label: pass --classes FILE (the teacher's class folders in order)"
            )
        return present
    names = list(classes)
    unknown = sorted(set(present) - set(names))
    if len(names) != num_classes or len(set(names)) != len(names) or unknown:
        raise ConfigError(
            f"--classes lists {len(names)} class folders ({len(set(names))} distinct) for "
            f"--num-classes {num_classes}, missing {unknown[:3]} of {folder}; list each of the "
            "teacher's class folders once, in label order"
        )
    return names


@dataclass(frozen=True)
class ImportResult:
    out: str
    num_samples: int
    views: int
    num_classes: int
    k: int
    encoding: str


def _label_files(source: Path) -> list[Path]:
    """Every FKD soft-label file under ``source``, in sorted path order."""
    if not source.is_dir():
        raise DatasetNotFoundError(f"no FKD soft-label folder at {source}; pass FKD's --save_path")
    files = sorted(source.rglob("*.tar"), key=lambda path: path.relative_to(source).parts)
    if not files:
        raise DatasetNotFoundError(f"{source} holds no FKD soft-label files (*.tar)")
    return files


def _load_label_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``coords`` (N, 4), ``flip`` (N,) and ``output`` (N, 2, k) of one FKD file."""
    import torch
    from numpy._core.multiarray import _reconstruct

    # FKD pickles numpy arrays: allow exactly what rebuilds one (under numpy 1's name too).
    allowed: list[Any] = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *(type(np.dtype(code)) for code in "?bhilqBHILQefd"),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
        coords, flips, output = (np.asarray(part) for part in state)
    except Exception as error:  # any damage in a foreign file: zip, pickle or layout
        raise SpecError(
            f"{path} is not an FKD soft-label file ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    if output.ndim != 3 or output.shape[1] != 2:
        raise SpecError(
            f"{path} holds soft labels of shape {output.shape}, not FKD's (crops, 2, k) "
            "(marginal_smoothing_k5/k10 or marginal_renorm_k5); hard and smoothing labels keep no "
            "distribution to import"
        )
    if coords.shape != (output.shape[0], 4) or flips.shape != (output.shape[0],):
        raise SpecError(
            f"{path} holds {coords.shape} boxes and {flips.shape} flips for {output.shape[0]} crops"
        )
    return coords.astype(np.float32), flips.astype(np.float32), output.astype(np.float64)


def import_fkd(
    source: str | Path,
    out: StoreLike,
    *,
    num_classes: int | None,
    input_size: int | None,
    files: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    encoding: str | None = None,
    teacher: str | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ImportResult:
    """Import FKD's soft-label folder ``source`` as a store of V views per image.

    ``input_size`` is the side S of the square inputs the views are replayed on (kdcache's
    dataset inputs); ``files`` lists the label files (relative to ``source``) in sample order
    [default: sorted paths, ImageFolder's order]; ``classes`` names the teacher's class folders
    in label order [default: the class folders present, sorted, which must then be
    ``num_classes``: a missing folder would shift every later label]."""
    num_classes = required(num_classes, "--num-classes", "the teacher's classes")
    input_size = required(
        input_size, "--input-size", "the side of kdcache's square inputs the crops map onto"
    )
    refuse_existing(out, overwrite)
    folder = Path(source)
    paths = _label_files(folder) if files is None else [folder / name for name in files]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} listed FKD files are missing, e.g. {missing[0]}"
        )
    _, _, output = _load_label_file(paths[0])
    views, k = output.shape[0], output.shape[2]
    classes_of = _class_folders(folder, paths, num_classes, classes)
    labels = np.array([classes_of.index(path.parent.name) for path in paths], dtype=np.int64)
    params = np.zeros((len(paths), views, len(FIELDS)), dtype=np.float32)
    digest = hashlib.sha256()
    for number, path in enumerate(paths):
        boxes, flips, soft = _load_label_file(path)
        if soft.shape != (views, 2, k):
            raise SpecError(
                f"{path} holds {soft.shape[0]} crops of top-{soft.shape[2]} labels but "
                f"{paths[0]} holds {views} of top-{k}; every image needs the same crops and k"
            )
        params[number, :, :4] = _pixel_boxes(boxes, input_size)
        params[number, :, 4] = flips
        digest.update(path.read_bytes())
    chosen = encoding or default_encoding(k, num_classes)

    def rows() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for number, path in enumerate(paths):
            _, _, soft = _load_label_file(path)
            with np.errstate(divide="ignore"):
                log_probs = np.log(soft[:, 1])
            dense = dense_from_top_k(
                log_probs,
                np.rint(soft[:, 0]).astype(np.int64),
                num_classes,
                kept=soft[:, 1] > 0,
                where=str(path),
            )
            yield number * views + np.arange(views), dense

    write_new_store(
        out,
        rows(),
        overwrite=overwrite,
        num_samples=len(paths),
        num_classes=num_classes,
        encoding=chosen,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=None if teacher is None else {"spec": teacher, "weights_sha256": None},
        dataset={
            "spec": f"fkd:{folder.resolve()}",
            "split": "train",
            "fingerprint": None,
            "class_names": classes_of,
        },
        extra={
            IMPORTED_FROM_KEY: {
                "format": "fkd",
                "source": str(folder.resolve()),
                "files_sha256": digest.hexdigest(),
                "kept_per_view": k,
                "temperature": 1.0,
                "missing_mass": "spread evenly over the classes outside the top-k",
                "views": f"FKD's crop boxes as pixel boxes of {input_size}x{input_size} inputs",
            }
        },
        fsync=fsync,
        views=views,
        # The seed is unused: the views are replayed from view_params, never drawn again.
        augment={
            "recipe": RECIPE,
            "seed": 0,
            "sampler": _SAMPLER,
            "fields": FIELDS,
            "input_size": [input_size, input_size],
        },
        view_params=params,
    )
    return ImportResult(
        out=parse_location(out).text,
        num_samples=len(paths),
        views=views,
        num_classes=num_classes,
        k=k,
        encoding=chosen,
    )
