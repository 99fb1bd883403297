"""Megatron-LM's offline-logit tar shards (NVIDIA/Megatron-LM) into a kdcache token store.

The format, as Megatron-LM's code writes it (``megatron/training/distillation/logits_saver.py``,
``LogitsSaverHooks``; names and helpers in ``megatron/training/distillation/utils_logits.py``):

- one folder of tar archives ``cp{C}_dp{D}__{I}.tar``, one series per context- and data-parallel
  rank, I the last iteration inside;
- each tar starts with ``_meta.json`` (``{"hash", "identifiers": {"seed", "sequence_length",
  "train_samples", "blend"}, "saver": {"k", "p", "min_k", "save_dtype"}}``) followed by one
  member ``{iteration}.pt.zst`` per training iteration: a zstd-compressed ``torch.save`` of
  ``{"values": [...], "indices_low": [...], "bit_17": [...]}``, one tensor per microbatch of
  shape (sequence, micro-batch, K): the top-K log-probabilities of the teacher at T = 1
  (fp16 by default), their vocabulary ids' low 16 bits (uint16) and 17th bit (bool);
- with top-p, trailing entries beyond a token's nucleus are padding: value -1e4, id -1.

Megatron replays its data stream by position, so the shards hold no token ids: the sample
order is iteration, then microbatch, then data-parallel rank, then row (Megatron's pretraining
sampler gives rank r rows r*b .. r*b + b - 1 of each microbatch's global batch of b * DP), and
the caller gives the token ids of those samples in that order (``tokens``, (N, S + 1)). Payloads
are loaded with ``torch.load(weights_only=True)`` (tensors only, no code). Context-parallel
shards (sequence split across ranks) are refused.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError
from kdcache.store.bridges.topk import (
    IMPORTED_FROM_KEY,
    batched,
    default_encoding,
    dense_from_top_k,
    refuse_existing,
    required,
    sequence_record,
    write_new_store,
)
from kdcache.store.format.layout import StoreLike, row_ranges
from kdcache.store.format.location import parse_location

__all__ = [
    "ImportResult",
    "import_megatron",
]

_SHARD_NAME = re.compile(r"^cp(?P<cp>\d+)_dp(?P<dp>\d+)__(?P<iter>\d+)\.tar$")
_META_MEMBER = "_meta.json"
_PAYLOAD_MEMBER = re.compile(r"^(?P<iter>\d+)\.pt\.zst$")
#: Megatron pads a top-p row with this value (and id -1); anything at or below it is padding.
_PADDING_LOG_PROB = -1e3


@dataclass(frozen=True)
class _Microbatch:
    """One microbatch of one rank: log-probs and ids, (rows, sequence, K)."""

    iteration: int
    rank: int
    number: int
    log_probs: np.ndarray
    ids: np.ndarray


def _shards(source: Path) -> dict[int, list[Path]]:
    """The tar shards of ``source`` by data-parallel rank, each rank's in iteration order."""
    if not source.is_dir():
        raise DatasetNotFoundError(f"no Megatron-LM logits folder at {source}; pass its folder")
    found: dict[int, list[tuple[int, Path]]] = {}
    context_ranks = set()
    for path in source.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match:
            context_ranks.add(int(match["cp"]))
            found.setdefault(int(match["dp"]), []).append((int(match["iter"]), path))
    if not found:
        raise DatasetNotFoundError(
            f"{source} holds no Megatron-LM logit shards (cp{{C}}_dp{{D}}__{{I}}.tar); pass the "
            "--logits-save-dir folder"
        )
    if context_ranks != {0}:
        raise SpecError(
            f"{source} holds shards of context-parallel ranks {sorted(context_ranks)}: each holds "
            "part of every sequence; only shards saved without context parallelism import"
        )
    ranks = sorted(found)
    if ranks != list(range(len(ranks))):
        raise SpecError(
            f"{source} holds data-parallel ranks {ranks}; every rank from 0 must be there"
        )
    return {rank: [path for _, path in sorted(found[rank])] for rank in ranks}


def _rank_payloads(paths: list[Path]) -> Iterator[tuple[int, dict[str, Any], bytes]]:
    """(iteration, metadata, compressed payload) of every member of one rank's shards."""
    for path in paths:
        meta: dict[str, Any] | None = None
        try:
            with tarfile.open(path, mode="r|*") as archive:
                for member in archive:
                    if not member.isreg():
                        continue
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if member.name == _META_MEMBER:
                        meta = json.loads(data)
                        continue
                    match = _PAYLOAD_MEMBER.match(member.name)
                    if match is None:
                        continue
                    if meta is None:
                        raise SpecError(
                            f"{path} has no leading {_META_MEMBER}; Megatron-LM writes it first"
                        )
                    yield int(match["iter"]), meta, data
        except (tarfile.TarError, json.JSONDecodeError, OSError) as error:
            raise SpecError(f"cannot read the Megatron-LM shard {path}: {error}") from None


def _decode(data: bytes, where: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The microbatches' log-probs and vocabulary ids of one iteration's payload."""
    import torch
    from numcodecs import Zstd

    try:
        tensors = torch.load(io.BytesIO(Zstd().decode(data)), weights_only=True)
        values = [np.asarray(t.float().numpy(), dtype=np.float32) for t in tensors["values"]]
        ids = [
            (high.numpy().astype(np.int64) << 16) | low.numpy().astype(np.int64)
            for low, high in zip(tensors["indices_low"], tensors["bit_17"], strict=True)
        ]
    except Exception as error:  # any damage in a foreign file: zstd, pickle or layout
        raise SpecError(
            f"{where} is not a Megatron-LM logits payload ({type(error).__name__}: "
            f"{str(error)[:120]})"
        ) from None
    return values, ids


def _read_microbatches(ranks: dict[int, list[Path]]) -> Iterator[tuple[dict, list[_Microbatch]]]:
    """Each iteration's microbatches of every rank, in sample order (iteration, microbatch,
    rank), with the first rank's metadata."""
    streams = {rank: _rank_payloads(paths) for rank, paths in ranks.items()}
    expected: int | None = None
    while True:
        entries = {rank: next(stream, None) for rank, stream in streams.items()}
        if all(entry is None for entry in entries.values()):
            return
        missing = [rank for rank, entry in entries.items() if entry is None]
        iterations = {entry[0] for entry in entries.values() if entry is not None}
        if missing or len(iterations) != 1:
            raise SpecError(
                f"the ranks' shards disagree at iterations {sorted(iterations)} (ranks "
                f"{missing} have no more); every data-parallel rank saves every iteration"
            )
        (iteration,) = iterations
        if expected is not None and iteration != expected:
            raise SpecError(
                f"iterations {expected}-{iteration - 1} are missing from the shards (found "
                f"{iteration} after {expected - 1}); import complete runs of iterations only"
            )
        expected = iteration + 1
        decoded = {
            rank: _decode(entry[2], f"iteration {iteration} of rank {rank}")
            for rank, entry in entries.items()
            if entry is not None
        }
        counts = {len(values) for values, _ in decoded.values()}
        if len(counts) != 1:
            raise SpecError(f"iteration {iteration}: ranks hold different microbatch counts")
        batches = []
        for number in range(counts.pop()):
            for rank, (values, ids) in decoded.items():
                # Megatron's logits are (sequence, batch, vocabulary): rows first here.
                batches.append(
                    _Microbatch(
                        iteration,
                        rank,
                        number,
                        np.moveaxis(values[number], 1, 0),
                        np.moveaxis(ids[number], 1, 0),
                    )
                )
        first_entry = entries[0]
        assert first_entry is not None
        yield first_entry[1], batches


@dataclass(frozen=True)
class ImportResult:
    out: str
    num_samples: int
    num_tokens: int
    num_classes: int
    encoding: str


def import_megatron(
    source: str | Path,
    out: StoreLike,
    *,
    tokens: np.ndarray,
    vocab_size: int | None,
    encoding: str | None = None,
    teacher: str | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    fsync: bool = True,
) -> ImportResult:
    """Import Megatron-LM's offline-logit shards in the folder ``source`` as a token store.

    ``tokens`` (N, S + 1) are the token ids of the N samples the shards hold, in training order
    (Megatron's samples are S + 1 tokens: position j of the logits predicts token j + 1);
    ``vocab_size`` is the teacher's vocabulary (padded output width). ``encoding`` [default:
    ``topk:K``] keeps the K stored log-probs exactly."""
    vocab_size = required(
        vocab_size, "--vocab-size", "the teacher's vocabulary (its padded output width)"
    )
    refuse_existing(out, overwrite)
    folder = Path(source)
    ranks = _shards(folder)
    ids = np.asarray(tokens)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2:
        raise ConfigError(
            f"tokens must be an (N, S + 1) integer array of the samples' token ids, got a "
            f"{ids.dtype} array of shape {ids.shape}"
        )
    counted, k = 0, 0
    meta: dict[str, Any] = {}
    for saved, batches in _read_microbatches(ranks):
        meta = saved
        for batch in batches:
            if batch.log_probs.shape[1] != ids.shape[1] - 1:
                raise SpecError(
                    f"iteration {batch.iteration} holds sequences of {batch.log_probs.shape[1]} "
                    f"positions but the tokens hold {ids.shape[1]} ids per sample; give S + 1 "
                    "token ids per sample of S positions"
                )
            counted += batch.log_probs.shape[0]
            k = max(k, batch.log_probs.shape[2])
    if counted != ids.shape[0]:
        raise ConfigError(
            f"the shards hold {counted} samples but tokens gives {ids.shape[0]}; give the token "
            "ids of exactly the samples the shards hold, in training order"
        )
    labels, arrays, extra = sequence_record(list(ids))
    outside = np.flatnonzero(ids.max(axis=1) >= vocab_size)
    if outside.size:
        raise ConfigError(
            f"samples {row_ranges(outside)} hold token ids beyond the vocabulary of {vocab_size}; "
            "pass the teacher's --vocab-size"
        )
    extra[IMPORTED_FROM_KEY] = {
        "format": "megatron-lm",
        "source": str(folder.resolve()),
        "dataset_hash": meta.get("hash"),
        "identifiers": meta.get("identifiers"),
        "saver": meta.get("saver"),
        "data_parallel_ranks": len(ranks),
        "kept_per_token": k,
        "temperature": 1.0,
        "missing_mass": "spread evenly over the classes outside the top-k",
    }
    chosen = encoding or default_encoding(k, vocab_size)
    length = ids.shape[1] - 1

    def rows() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        sample = 0
        for _, batches in _read_microbatches(ranks):
            for batch in batches:
                values = batch.log_probs.reshape(-1, batch.log_probs.shape[2])
                classes = batch.ids.reshape(values.shape)
                start = sample * length
                for part in batched(len(values)):
                    dense = dense_from_top_k(
                        values[part],
                        classes[part],
                        vocab_size,
                        kept=values[part] > _PADDING_LOG_PROB,
                        where=f"iteration {batch.iteration} of rank {batch.rank}",
                    )
                    yield np.arange(start + part.start, start + part.stop), dense
                sample += batch.log_probs.shape[0]

    write_new_store(
        out,
        rows(),
        overwrite=overwrite,
        num_samples=int(arrays["offsets"][-1]),
        num_classes=vocab_size,
        encoding=chosen,
        labels=labels,
        chunk_rows=chunk_rows,
        teacher=None if teacher is None else {"spec": teacher, "weights_sha256": None},
        dataset={"spec": f"megatron:{folder.resolve()}", "split": None, "fingerprint": None},
        extra=extra,
        fsync=fsync,
        arrays=arrays,
    )
    return ImportResult(
        out=parse_location(out).text,
        num_samples=ids.shape[0],
        num_tokens=int(arrays["offsets"][-1]),
        num_classes=vocab_size,
        encoding=chosen,
    )
