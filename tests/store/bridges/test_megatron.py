"""Megatron-LM's offline-logit tar shards imported into a token store.

The synthetic shards are written as Megatron-LM's LogitsSaverHooks writes them
(megatron/training/distillation/logits_saver.py: a leading _meta.json, then one zstd-compressed
torch.save payload per iteration of per-microbatch (sequence, batch, K) fp16 log-probs, uint16 low
id bits and a bool 17th bit; top-p padding -1e4 with id -1; one cp{C}_dp{D}__{I}.tar per rank).
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from narrowing import sparse
from numcodecs import Zstd

from kdcache.errors import ConfigError, SpecError
from kdcache.store.bridges.megatron import import_megatron
from kdcache.store.bridges.topk import IMPORTED_FROM_KEY
from kdcache.store.sequence import open_sequence_store
from kdcache.store.tools.verify import verify_store

VOCAB = 70_000  # ids above 65,535 need Megatron's 17th bit
RANKS, MICRO, BATCH, LENGTH, K = 2, 2, 2, 3, 4
META = {"hash": "abc", "identifiers": {"seed": 1234, "sequence_length": LENGTH}, "saver": {"k": K}}


def member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def teacher_top_k(sample: int) -> tuple[np.ndarray, np.ndarray]:
    """(LENGTH, K) log-probs and ids that name the sample: its top id is 65,536 + sample."""
    ids = np.array([[65_536 + sample, 7, 60_000 + position, 3] for position in range(LENGTH)])
    log_probs = np.log(np.array([[0.5, 0.2, 0.1, 0.05]] * LENGTH))
    if sample == 5:  # a top-p row: the last entry is Megatron's padding
        log_probs[:, 3], ids[:, 3] = -1e4, -1
    return log_probs, ids


def write_shards(folder, iterations=(10, 11)) -> int:
    """Shards of ``iterations``; returns the samples they hold (in Megatron's order)."""
    folder.mkdir()
    sample = 0
    payloads: dict[int, list[tuple[int, bytes]]] = {rank: [] for rank in range(RANKS)}
    for iteration in iterations:
        parts: dict[int, dict[str, list]] = {
            rank: {"values": [], "indices_low": [], "bit_17": []} for rank in range(RANKS)
        }
        for _ in range(MICRO):
            for rank in range(RANKS):
                rows = [teacher_top_k(sample + row) for row in range(BATCH)]
                values = np.stack([log_probs for log_probs, _ in rows], axis=1)  # (S, B, K)
                ids = torch.from_numpy(np.stack([ids for _, ids in rows], axis=1))
                parts[rank]["values"].append(torch.from_numpy(values).to(torch.float16))
                parts[rank]["indices_low"].append((ids & 0xFFFF).to(torch.uint16))
                parts[rank]["bit_17"].append((ids >> 16).to(torch.bool))
                sample += BATCH
        for rank in range(RANKS):
            buffer = io.BytesIO()
            torch.save(parts[rank], buffer)
            payloads[rank].append((iteration, Zstd(level=3).encode(buffer.getvalue())))
    for rank, entries in payloads.items():
        with tarfile.open(folder / f"cp0_dp{rank}__{iterations[-1]}.tar", "w") as archive:
            member(archive, "_meta.json", json.dumps(META).encode())
            for iteration, data in entries:
                member(archive, f"{iteration}.pt.zst", data)
    return sample


def tokens_for(count: int) -> np.ndarray:
    return np.arange(count * (LENGTH + 1)).reshape(count, LENGTH + 1) % 50


def test_shards_import_in_megatrons_sample_order(tmp_path):
    count = write_shards(tmp_path / "logits")
    assert count == 2 * MICRO * RANKS * BATCH
    result = import_megatron(
        tmp_path / "logits", tmp_path / "lm.zarr", tokens=tokens_for(count), vocab_size=VOCAB
    )
    assert (result.num_samples, result.num_tokens, result.encoding) == (16, 48, "topk:4")
    store = open_sequence_store(tmp_path / "lm.zarr")
    assert verify_store(tmp_path / "lm.zarr").ok
    for sample in range(count):
        np.testing.assert_array_equal(store.tokens(sample), tokens_for(count)[sample])
        rows = sparse(store.read([sample]))
        top, tail = rows.log_probs(1.0)
        # Sample order: iteration, microbatch, rank, row; the 17-bit id comes back whole.
        assert rows.indices[:, 0].tolist() == [65_536 + sample] * LENGTH
        np.testing.assert_allclose(top[:, 0].exp().numpy(), 0.5, atol=1e-3)
        kept = 0.8 if sample == 5 else 0.85  # top-p padding is no class: its mass is missing
        np.testing.assert_allclose(tail.exp().numpy(), 1 - kept, atol=1e-3)
    origin = store.metadata.extra[IMPORTED_FROM_KEY]
    assert (origin["dataset_hash"], origin["data_parallel_ranks"]) == ("abc", 2)


def test_mismatched_tokens_and_broken_shards_are_refused(tmp_path):
    count = write_shards(tmp_path / "logits")
    with pytest.raises(ConfigError, match="the shards hold 16 samples but tokens gives 15"):
        import_megatron(
            tmp_path / "logits", tmp_path / "a.zarr", tokens=tokens_for(15), vocab_size=VOCAB
        )
    with pytest.raises(SpecError, match="sequences of 3 positions"):
        import_megatron(
            tmp_path / "logits",
            tmp_path / "b.zarr",
            tokens=np.zeros((count, 3), dtype=np.int64),
            vocab_size=VOCAB,
        )
    write_shards(tmp_path / "gap", iterations=(10, 12))
    with pytest.raises(SpecError, match="iterations 11-11 are missing"):
        import_megatron(
            tmp_path / "gap", tmp_path / "c.zarr", tokens=tokens_for(count), vocab_size=VOCAB
        )
    (tmp_path / "logits" / "cp1_dp0__11.tar").write_bytes(b"")
    with pytest.raises(SpecError, match="context-parallel ranks"):
        import_megatron(
            tmp_path / "logits", tmp_path / "d.zarr", tokens=tokens_for(count), vocab_size=VOCAB
        )
    assert not any(p.suffix == ".zarr" for p in tmp_path.iterdir())


def test_the_command_needs_the_tokens_and_imports(tmp_path):
    count = write_shards(tmp_path / "logits")
    np.save(tmp_path / "tokens.npy", tokens_for(count))
    common = ["import", "megatron", str(tmp_path / "logits"), "--vocab-size", str(VOCAB)]
    done = run_cli(
        *common, "--tokens", str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "a.zarr")
    )
    assert "16 sequences" in done.stdout
    np.save(tmp_path / "short.npy", tokens_for(3))
    refused = run_cli(
        *common,
        "--tokens",
        str(tmp_path / "short.npy"),
        "--out",
        str(tmp_path / "b.zarr"),
        check=False,
    )
    assert_one_line_error(refused, "the shards hold 16 samples but tokens gives 3")
