"""DistillKit's Parquet logit sets (arcee-ai/DistillKit) into a kdcache token store, and back.

The format, as DistillKit's own code writes and reads it:

- ``distillkit/sample_logits_vllm.py`` writes ``data_{i}.parquet`` files (schema
  ``compressed_logit_schema`` in ``distillkit/sample_common.py``: ``input_ids`` list<uint64>,
  ``compressed_logprobs`` and ``bytepacked_indices`` list<list<uint8>>) and
  ``compression_config.yaml`` (a ``DistributionQuantizationConfig``,
  ``distillkit/compression/config.py``). Row p of a sample's two byte lists is vLLM's prompt
  log-probabilities at position p + 1: the teacher's k largest raw log-probs (T = 1) of the
  token after ``input_ids[p]``, sorted descending; a sample of L tokens has L - 1 rows, exactly a
  kdcache token store's rows.
- ``distillkit/compression/bitpack.py``: the k token ids, ceil(log2 d) bits each, most
  significant bit first, packed into bytes.
- ``distillkit/compression/monotonic_logprobs.py``: with ``delta_encoding`` the values are
  differences to the previous one (the first kept); then ``exact_k`` values in ``exact_dtype``,
  the coefficients of a least-squares fit of the remaining k - exact_k over the terms
  ``polynomial_terms`` (powers of t = 0..n-1, or of linspace(0, 1, n) with ``normalize_t``, or
  ``sqrt``/``exp`` of it) in ``term_dtype``, then per residual bin a scale (``scale_dtype``) and
  ``num_elements`` residuals quantised to ``element_bits`` (offset by -2^(b-1), or {-1, +1} for
  one bit); residuals past the bins are zero.

The legacy layout (``packed_indices``, ``exact_values``, ``coeffs``) holds logits shifted by an
unknown constant, not log-probabilities, so the tail mass cannot be recovered: it is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, DatasetNotFoundError, InvalidLogitsError, SpecError
from kdcache.logits.encodings import SampledEncoding
from kdcache.store.bridges.topk import (
    IMPORTED_FROM_KEY,
    batched,
    default_encoding,
    dense_from_top_k,
    refuse_existing,
    sequence_record,
    write_new_store,
)
from kdcache.store.format.layout import StoreLike, row_ranges
from kdcache.store.format.location import parse_location
from kdcache.store.sequence import open_sequence_store

__all__ = [
    "ExportResult",
    "ImportResult",
    "export_distillkit",
    "import_distillkit",
]

_CONFIG_FILE = "compression_config.yaml"
_DTYPES = {"float16": "<f2", "bfloat16": "bfloat16", "float32": "<f4", "float64": "<f8"}
_SPECIAL_TERMS = ("sqrt", "exp")
#: Rows per Parquet file of an export (DistillKit's ``--macrobatch-size`` default).
_ROWS_PER_FILE = 256


@dataclass(frozen=True)
class _ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class _CompressionConfig:
    """DistillKit's ``DistributionQuantizationConfig``: how one row's bytes hold k log-probs."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple[int | str, ...] = ()
    term_dtype: str = "float32"
    residual_bins: tuple[_ResidualBin, ...] = ()
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.d)))

    @property
    def row_bytes(self) -> int:
        size = self.exact_k * _itemsize(self.exact_dtype)
        size += len(self.polynomial_terms) * _itemsize(self.term_dtype)
        for part in self.residual_bins:
            size += _itemsize(part.scale_dtype) + (part.element_bits * part.num_elements + 7) // 8
        return size

    @property
    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8

    def to_dict(self) -> dict[str, Any]:
        return {
            "d": self.d,
            "k": self.k,
            "exact_k": self.exact_k,
            "exact_dtype": self.exact_dtype,
            "polynomial_terms": list(self.polynomial_terms) or None,
            "term_dtype": self.term_dtype,
            "residual_bins": [vars(part) for part in self.residual_bins],
            "delta_encoding": self.delta_encoding,
            "error_diffusion": self.error_diffusion,
            "normalize_t": self.normalize_t,
        }

    @staticmethod
    def from_dict(record: Any, *, where: str) -> _CompressionConfig:
        def fail(what: str) -> ConfigError:
            return ConfigError(
                f"{where} is not a DistillKit compression config ({what}); pass the "
                f"{_CONFIG_FILE} written with the logits"
            )

        if not isinstance(record, dict):
            raise fail("not a mapping")
        try:
            terms = tuple(record.get("polynomial_terms") or ())
            bins = tuple(
                _ResidualBin(str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                for b in record.get("residual_bins") or ()
            )
            config = _CompressionConfig(
                d=int(record["d"]),
                k=int(record["k"]),
                exact_k=int(record["exact_k"]),
                exact_dtype=str(record.get("exact_dtype", "float32")),
                polynomial_terms=terms,
                term_dtype=str(record.get("term_dtype", "float32")),
                residual_bins=bins,
                delta_encoding=bool(record.get("delta_encoding", True)),
                error_diffusion=bool(record.get("error_diffusion", False)),
                normalize_t=bool(record.get("normalize_t", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise fail(f"{type(error).__name__}: {error}") from None
        dtypes = [config.exact_dtype, config.term_dtype, *(b.scale_dtype for b in bins)]
        if any(dtype not in _DTYPES for dtype in dtypes):
            raise fail(f"dtypes {dtypes}, expected each of {sorted(_DTYPES)}")
        if not all(isinstance(t, int) or t in _SPECIAL_TERMS for t in terms):
            raise fail(f"polynomial_terms {list(terms)}, expected integers, 'sqrt' or 'exp'")
        if not (config.d >= 2 and 0 <= config.exact_k <= config.k <= config.d):
            raise fail(f"d={config.d}, k={config.k}, exact_k={config.exact_k}")
        if any(not 1 <= b.element_bits <= 64 or b.num_elements < 1 for b in bins):
            raise fail("a residual bin with element_bits outside 1-64 or no elements")
        if sum(b.num_elements for b in bins) > config.k - config.exact_k:
            raise fail("residual bins hold more than k - exact_k values")
        return config


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(_DTYPES[dtype]).itemsize


def _floats(raw: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """``count`` little-endian values of ``dtype`` per row of bytes ``raw`` (n, count * size),
    as float64 (bfloat16 is the top half of a float32)."""
    if dtype == "bfloat16":
        halves = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(len(raw), count).astype(np.float64)
    values = np.ascontiguousarray(raw).view(_DTYPES[dtype]).reshape(len(raw), count)
    return values.astype(np.float64)


def _unpack_bits(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` unsigned integers of ``bits`` bits per row of ``raw`` (n, bytes), most
    significant bit first (DistillKit's ``unpack_from_bytes``)."""
    stream = np.unpackbits(np.ascontiguousarray(raw, dtype=np.uint8), axis=1)
    fields = stream[:, : count * bits].reshape(len(raw), count, bits).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(bits - 1, -1, -1, dtype=np.uint64))
    return (fields * weights).sum(axis=2).astype(np.int64)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`_unpack_bits`: rows of integers (n, count) into bytes."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    fields = (values.astype(np.uint64)[:, :, None] >> shifts) & np.uint64(1)
    return np.packbits(fields.reshape(len(values), -1).astype(np.uint8), axis=1)


def _terms(config: _CompressionConfig, count: int) -> np.ndarray:
    points = (
        np.linspace(0.0, 1.0, count) if config.normalize_t else np.arange(count, dtype=np.float64)
    )
    columns = [
        points**term if isinstance(term, int) else getattr(np, term)(points)
        for term in config.polynomial_terms
    ]
    return np.stack(columns, axis=1) if columns else np.zeros((count, 0))


def _decompress_log_probs(raw: np.ndarray, config: _CompressionConfig) -> np.ndarray:
    """The k log-probabilities (n, k) held in each row of bytes ``raw`` (n, row_bytes)."""
    n = len(raw)
    position = 0

    def take(size: int) -> np.ndarray:
        nonlocal position
        part = raw[:, position : position + size]
        position += size
        return part

    exact = _floats(
        take(config.exact_k * _itemsize(config.exact_dtype)), config.exact_dtype, config.exact_k
    )
    approximated = config.k - config.exact_k
    coefficients = _floats(
        take(len(config.polynomial_terms) * _itemsize(config.term_dtype)),
        config.term_dtype,
        len(config.polynomial_terms),
    )
    residuals = np.zeros((n, approximated))
    start = 0
    for part in config.residual_bins:
        scale = _floats(take(_itemsize(part.scale_dtype)), part.scale_dtype, 1)
        codes = _unpack_bits(
            take((part.element_bits * part.num_elements + 7) // 8),
            part.element_bits,
            part.num_elements,
        )
        if part.element_bits == 1:
            levels = codes * 2.0 - 1.0
        else:
            levels = codes - 2.0 ** (part.element_bits - 1)
        residuals[:, start : start + part.num_elements] = levels * scale
        start += part.num_elements
    fit = coefficients @ _terms(config, approximated).T if config.polynomial_terms else 0.0
    values = np.concatenate([exact, fit + residuals], axis=1)
    return np.cumsum(values, axis=1) if config.delta_encoding else values


def _read_config(path: Path) -> _CompressionConfig:
    import yaml

    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"no {path.name} at {path.parent}; DistillKit writes it beside the Parquet files "
            "(pass --config FILE if it lies elsewhere)"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    return _CompressionConfig.from_dict(record, where=str(path))


def _parquet_files(source: Path) -> list[Path]:
    """DistillKit's ``data_{i}.parquet`` files of ``source`` (a folder, or one file) in the
    order written: by i, numerically."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DatasetNotFoundError(f"no DistillKit logit set at {source}; pass its folder")
    files = sorted(
        source.glob("*.parquet"),
        key=lambda path: (
            int(path.stem.rpartition("_")[2]) if path.stem.rpartition("_")[2].isdigit() else -1,
            path.name,
        ),
    )
    if not files:
        raise DatasetNotFoundError(f"{source} holds no .parquet files; pass a DistillKit logit set")
    return files


@dataclass(frozen=True)
class _DistillKitSample:
    input_ids: np.ndarray
    log_probs: np.ndarray
    token_ids: np.ndarray


def _read_samples(files: list[Path], config: _CompressionConfig) -> Iterator[_DistillKitSample]:
    """Every sample of ``files`` in order, decoded (one Parquet row group batch at a time)."""
    import pyarrow.parquet as pq

    number = 0
    for path in files:
        table = pq.ParquetFile(path)
        columns = set(table.schema_arrow.names)
        if {"packed_indices", "exact_values", "coeffs"} <= columns:
            raise SpecError(
                f"{path} is in DistillKit's legacy layout (packed_indices, exact_values, coeffs): "
                "shifted logits whose tail mass cannot be recovered; re-sample it with "
                "DistillKit's current sample_logits_vllm.py"
            )
        needed = {"input_ids", "compressed_logprobs", "bytepacked_indices"}
        if not needed <= columns:
            raise SpecError(
                f"{path} lacks DistillKit's columns {sorted(needed - columns)} (has "
                f"{sorted(columns)}); pass a set written by DistillKit's sample_logits_vllm.py"
            )
        for batch in table.iter_batches(batch_size=16, columns=sorted(needed)):
            records = batch.to_pydict()
            for ids, logprobs, indices in zip(
                records["input_ids"],
                records["compressed_logprobs"],
                records["bytepacked_indices"],
                strict=True,
            ):
                yield _decoded(number, path, ids, logprobs, indices, config)
                number += 1


def _decoded(
    number: int, path: Path, ids: Any, logprobs: Any, indices: Any, config: _CompressionConfig
) -> _DistillKitSample:
    tokens = np.asarray(ids, dtype=np.int64)
    rows = len(logprobs)
    if rows != tokens.size - 1 or len(indices) != rows:
        raise SpecError(
            f"{path}: sample {number} has {tokens.size} input ids but {rows} log-prob rows and "
            f"{len(indices)} index rows; DistillKit writes one row per token after the first"
        )
    values = np.asarray(logprobs, dtype=np.uint8).reshape(rows, -1)
    packed = np.asarray(indices, dtype=np.uint8).reshape(rows, -1)
    if values.shape[1] != config.row_bytes or packed.shape[1] != config.index_bytes:
        raise SpecError(
            f"{path}: sample {number} holds rows of {values.shape[1]} and {packed.shape[1]} bytes "
            f"but its compression config says {config.row_bytes} and {config.index_bytes}; pass "
            f"the {_CONFIG_FILE} written with these logits"
        )
    return _DistillKitSample(
        input_ids=tokens,
        log_probs=_decompress_log_probs(values, config),
        token_ids=_unpack_bits(packed, config.index_bits, config.k),
    )


@dataclass(frozen=True)
class ImportResult:
    out: str
    num_samples: int
    num_tokens: int
    num_classes: int
    encoding: str


def import_distillkit(
    source: str | Path,
    out: StoreLike,
    *,
    config: str | Path | None = None,
    vocab_size: int | None = None,
    encoding: str | None = None,
    teacher: str | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ImportResult:
    """Import the DistillKit logit set ``source`` (its folder of Parquet files) as a token store.

    ``vocab_size`` is the store's vocabulary V [default: the config's ``d``]; ``encoding``
    [default: ``topk:k``] keeps the k log-probs exactly. The sample order is the files' (by
    number) and rows' order; every sample's token ids are kept (``first_token`` and labels)."""
    refuse_existing(out, overwrite)
    folder = Path(source)
    files = _parquet_files(folder)
    config_path = Path(config) if config is not None else files[0].parent / _CONFIG_FILE
    settings = _read_config(config_path)
    classes = settings.d if vocab_size is None else vocab_size
    sequences = [sample.input_ids for sample in _read_samples(files, settings)]
    too_large = [i for i, tokens in enumerate(sequences) if tokens.size and tokens.max() >= classes]
    if too_large:
        raise InvalidLogitsError(
            f"samples {row_ranges(np.array(too_large))} hold token ids beyond the vocabulary of "
            f"{classes}; pass --vocab-size with the teacher's vocabulary"
        )
    labels, arrays, extra = sequence_record(sequences)
    extra[IMPORTED_FROM_KEY] = {
        "format": "distillkit",
        "source": str(folder.resolve()),
        "files_sha256": _files_digest(files),
        "compression_config": settings.to_dict(),
        "kept_per_token": settings.k,
        "temperature": 1.0,
        "missing_mass": "spread evenly over the classes outside the top-k",
    }
    chosen = encoding or default_encoding(settings.k, classes)
    offsets = arrays["offsets"]

    def rows() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for number, sample in enumerate(_read_samples(files, settings)):
            start = int(offsets[number])
            for part in batched(len(sample.log_probs)):
                dense = dense_from_top_k(
                    sample.log_probs[part],
                    sample.token_ids[part],
                    classes,
                    where=f"{folder} sample {number}",
                )
                yield np.arange(start + part.start, start + part.stop), dense

    write_new_store(
        out,
        rows(),
        overwrite=overwrite,
        num_samples=int(offsets[-1]),
        num_classes=classes,
        encoding=chosen,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=None if teacher is None else {"spec": teacher, "weights_sha256": None},
        dataset={"spec": f"distillkit:{folder.resolve()}", "split": None, "fingerprint": None},
        extra=extra,
        fsync=fsync,
        arrays=arrays,
    )
    return ImportResult(
        out=parse_location(out).text,
        num_samples=len(sequences),
        num_tokens=int(offsets[-1]),
        num_classes=classes,
        encoding=chosen,
    )


def _files_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportResult:
    out: str
    num_samples: int
    num_files: int
    k: int


def export_distillkit(
    store: StoreLike,
    out: str | Path,
    *,
    top_k: int | None = None,
    rows_per_file: int = _ROWS_PER_FILE,
) -> ExportResult:
    """Write the token store ``store`` as a DistillKit logit set in the folder ``out``.

    Each token's k largest log-probabilities at T = 1 (normalised over the whole vocabulary: a
    ``topk:K`` store's tail mass is accounted for) are written exactly, as float32 with no
    polynomial or residuals (``exact_k = k``, ``delta_encoding: false``), with their ids
    bit-packed; ``compression_config.yaml`` says so. ``top_k`` [default: K of a ``topk:K``
    store, required for a dense one] must not exceed a ``topk:K`` store's K; ``sampled:S``
    stores are refused (draws are not a top-k)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    sequences = open_sequence_store(store)
    encoding = sequences.store.encoding
    if isinstance(encoding, SampledEncoding):
        raise SpecError(
            f"{sequences.where} holds sampled draws ({encoding.name}), not a top-k; DistillKit's "
            "layout holds each token's k largest log-probs: export a dense or topk:K store"
        )
    stored_k = getattr(encoding, "k", None)
    k = top_k if top_k is not None else stored_k
    if k is None:
        raise ConfigError(
            f"{sequences.where} is dense ({encoding.name}); pass --top-k K (DistillKit keeps the "
            "K largest log-probs of each token)"
        )
    if not 1 <= k < sequences.vocab_size or (stored_k is not None and k > stored_k):
        limit = sequences.vocab_size - 1 if stored_k is None else stored_k
        raise ConfigError(f"--top-k must lie in [1, {limit}] for {sequences.where}, got {k}")
    target = Path(out)
    if target.exists():
        raise ConfigError(f"{target} already exists; choose a new folder for the export")
    settings = _CompressionConfig(
        d=sequences.vocab_size, k=k, exact_k=k, exact_dtype="float32", delta_encoding=False
    )
    staging = target.with_name(target.name + ".incoming")
    staging.mkdir(parents=True)
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint64())),
            pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    files = 0
    try:
        for number, part in enumerate(batched(sequences.num_sequences, rows_per_file)):
            records: dict[str, list] = {name: [] for name in schema.names}
            for sample in range(part.start, part.stop):
                log_probs, token_ids = _top_log_probs(sequences.read([sample]), k)
                records["input_ids"].append(sequences.tokens(sample).tolist())
                records["compressed_logprobs"].append(
                    log_probs.astype("<f4").view(np.uint8).reshape(len(log_probs), -1).tolist()
                )
                records["bytepacked_indices"].append(
                    _pack_bits(token_ids, settings.index_bits).tolist()
                )
            table = pa.Table.from_pydict(records, schema=schema)
            pq.write_table(table, staging / f"data_{number}.parquet")
            files += 1
        (staging / _CONFIG_FILE).write_text(yaml.safe_dump(settings.to_dict()), encoding="utf-8")
        staging.rename(target)
    except BaseException:
        for path in staging.glob("*"):
            path.unlink()
        staging.rmdir()
        raise
    return ExportResult(out=str(target), num_samples=sequences.num_sequences, num_files=files, k=k)


def _top_log_probs(rows: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest log-probabilities (n, k) at T = 1 of token rows, descending, and their ids."""
    import torch

    from kdcache.logits.sparse import SparseLogits

    if isinstance(rows, SparseLogits):
        top, _ = rows.log_probs(1.0)
        values, order = top.topk(k, dim=1)
        ids = rows.indices.gather(1, order)
    else:
        values, ids = torch.log_softmax(rows.double(), dim=1).topk(k, dim=1)
    return values.double().numpy(), ids.numpy()
