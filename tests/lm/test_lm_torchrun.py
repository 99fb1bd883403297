"""A language-model dump under `torchrun --nproc-per-node 2` (gloo on CPU): a 2-rank dump
stopped midway resumed by one process, and a one-process dump stopped midway resumed by 2 ranks,
both bit-identical to an uninterrupted one-process dump. The two torchrun jobs run at once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lm_teachers
import numpy as np
import pytest
import zarr
from lm_fixtures import (  # noqa: F401  (provide the lm_files and chat_files fixtures)
    chat_files_fixture,
    lm_files_fixture,
)
from narrowing import kdcache_record, stored
from test_torchrun import finish, torchrun

from kdcache.config import DumpConfig
from kdcache.lm.dump import dump_lm
from kdcache.store.sequence import open_sequence_store

#: ~500 token rows of ~27 sequences: units of 5 chunks (one batch's rows), ~13 units.
DUMP: dict[str, Any] = dict(chunk_rows=8, batch_size=2, encoding="sampled:8")


def contents(store: Path) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(str(store), mode="r")
    record = dict(kdcache_record(group))
    for key in ("created_at", "generation", "fidelity"):  # each store's own, or its last run's
        record.pop(key)
    # Chunk digests bind each chunk to its store's generation: equal only within one store.
    arrays = {name: stored(group, name) for name in group.array_keys() if name != "chunk_digests"}
    return arrays, record


def assert_same_store(store: Path, reference: Path) -> None:
    (got, got_record), (expected, expected_record) = contents(store), contents(reference)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert got_record == expected_record


def written(store: Path) -> np.ndarray:
    return stored(zarr.open_group(str(store), mode="r"), "chunk_written")


def test_a_dump_stopped_midway_resumes_bit_identically_with_another_number_of_ranks(
    tmp_path, lm_files
):
    lm_teachers.FOLDER = str(lm_files["teacher"])
    options: dict[str, Any] = dict(
        teacher="lm_teachers:flaky",
        dataset=f"text:{lm_files['corpus']}:16",
        device="cpu",  # bit-identity is a CPU property
        **DUMP,
    )
    reference = tmp_path / "reference.zarr"
    dump_lm(DumpConfig(out=str(reference), **options))

    one = tmp_path / "one.zarr"  # stopped in one process, resumed by 2 ranks
    lm_teachers.FAIL_AFTER = 4
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(out=str(one), **options))
    finally:
        lm_teachers.FAIL_AFTER = None
    assert 0 < written(one).sum() < len(written(one))

    two = tmp_path / "two.zarr"  # stopped on 2 ranks, resumed by one process
    args = ["dump-teacher", "--teacher", "lm_teachers:flaky", "--device", "cpu"]
    args += ["--dataset", options["dataset"]]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in DUMP.items()]
    env = {"PYTHONPATH": str(Path(__file__).parent), "KDCACHE_TEST_LM_FOLDER": lm_teachers.FOLDER}
    stopped = torchrun(*args, "--out", str(two), env={**env, "KDCACHE_TEST_FAIL_AFTER": "4"})
    resumed = torchrun(*args, "--out", str(one), "--resume", env=env)
    assert "sequences" in finish(resumed)
    stopped.communicate(timeout=300)
    assert stopped.returncode != 0
    flags = written(two)
    assert 0 < flags.sum() < len(flags)
    # Units of 5 chunks, dealt in turn: each rank wrote chunks of its own units before stopping.
    units = np.flatnonzero(flags) // 5
    assert {0, 1} <= set((units % 2).tolist())

    assert_same_store(one, reference)
    copy = tmp_path / "two-copy.zarr"
    shutil.copytree(two, copy)
    result = dump_lm(DumpConfig(out=str(copy), resume=True, **options))
    assert 0 < result.rows_computed < result.num_tokens
    assert_same_store(copy, reference)


def test_a_packed_chat_dump_of_assistant_rows_on_2_ranks_equals_the_one_process_dump(
    tmp_path, chat_files
):
    options: dict[str, Any] = dict(
        teacher=f"hf:{chat_files['teacher']}",
        dataset=f"jsonl:{chat_files['chat']}:16",
        train_on="assistant",
        pack=True,
        device="cpu",  # bit-identity is a CPU property
        **DUMP,
    )
    reference = tmp_path / "reference.zarr"
    dump_lm(DumpConfig(out=str(reference), **options))
    data = open_sequence_store(reference).metadata.dataset["fingerprint"]["data"]
    assert data["packed"]
    assert data["train_on"] == "assistant"
    assert len(written(reference)) > 2 * 5  # more than one unit of 5 chunks: both ranks write

    ranks = tmp_path / "ranks.zarr"
    args = ["dump-teacher", "--teacher", options["teacher"], "--device", "cpu"]
    args += ["--dataset", options["dataset"], "--train-on", "assistant", "--pack"]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in DUMP.items()]
    finish(torchrun(*args, "--out", str(ranks)))
    assert_same_store(ranks, reference)
