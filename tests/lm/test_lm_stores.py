"""Token stores as complete as image stores: pack keeps every array, --overwrite replaces one
safely, and the text is recorded resolved and matched by its content, not its path's spelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lm_teachers
import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from narrowing import dense, kdcache_record, stored
from older_stores import as_previous_release
from safetensors.torch import load_file
from zarr.storage import ZipStore

from kdcache import DistillConfig, distill
from kdcache.config import DumpConfig
from kdcache.errors import DatasetNotFoundError, SpecError, StoreMismatchError
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset
from kdcache.store.sequence import open_sequence_store
from kdcache.store.tools.pack import pack_store
from kdcache.store.tools.verify import verify_store


@pytest.fixture(scope="module", name="dumped")
def dumped_fixture(lm_files, tmp_path_factory):
    """root/t.zarr, dumped from root/data with the text spelled relative: text:corpus.jsonl:16."""
    root = tmp_path_factory.mktemp("dumped")
    (root / "data").mkdir()
    shutil.copy(lm_files["corpus"], root / "data" / "corpus.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "data")
        dump_lm(
            DumpConfig(
                teacher=f"hf:{lm_files['teacher']}",
                dataset="text:corpus.jsonl:16",
                out=str(root / "t.zarr"),
                batch_size=16,
                chunk_rows=64,  # several chunks of every row array
            )
        )
    return root


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_pack_keeps_every_array_and_the_zip_distills_the_same_student(tmp_path, lm_files, dumped):
    store = dumped / "t.zarr"
    pack_store(store, tmp_path / "t.zip")
    folder = zarr.open_group(str(store), mode="r")
    packed = zarr.open_group(ZipStore(tmp_path / "t.zip", mode="r"), mode="r")
    names = sorted(name for name, _ in folder.arrays())
    assert {"offsets", "first_token", "labels", "logits"} <= set(names)
    assert sorted(name for name, _ in packed.arrays()) == names
    for name in names:
        np.testing.assert_array_equal(stored(packed, name), stored(folder, name), err_msg=name)
    assert kdcache_record(packed) == kdcache_record(folder)

    finals, weights = [], []
    for source in (store, tmp_path / "t.zip"):
        out = tmp_path / source.suffix.lstrip(".")
        result = distill(
            DistillConfig(
                student=f"hf:{lm_files['student']}",
                cache=str(source),
                epochs=1,
                batch_size=8,
                temperature=2.0,
                out=str(out),
            )
        )
        finals.append(result.final)
        weights.append(load_file(out / "last" / "model.safetensors"))
    assert finals[0] == finals[1]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_distill_finds_the_recorded_text_from_any_folder(tmp_path, lm_files, dumped):
    corpus = (dumped / "data" / "corpus.jsonl").resolve()
    record = open_sequence_store(dumped / "t.zarr").metadata.dataset
    assert record["spec"] == f"text:{corpus}:16"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli(
        "distill",
        "--cache",
        str(dumped / "t.zarr"),
        "--student",
        f"hf:{lm_files['student']}",
        "--epochs",
        "1",
        "--out",
        "run",
        cwd=elsewhere,
    )
    saved = json.loads((elsewhere / "run" / "config.json").read_text())
    assert saved["resolved"]["dataset"] == record["spec"]


def test_a_moved_text_is_matched_by_content_and_a_changed_one_refused(
    tmp_path, lm_files, dumped, monkeypatch
):
    corpus = dumped / "data" / "corpus.jsonl"
    original = corpus.read_bytes()
    monkeypatch.chdir(tmp_path)
    common: dict[str, Any] = dict(
        student=f"hf:{lm_files['student']}", cache=str(dumped / "t.zarr"), epochs=1, batch_size=16
    )
    Path("moved").mkdir()
    corpus.rename("moved/renamed.jsonl")
    try:
        with pytest.raises(DatasetNotFoundError, match="pass --dataset text:FILE") as refused:
            distill(DistillConfig(**common, out="lost"))
        assert str(corpus.resolve()) in one_line(refused)
        distill(DistillConfig(**common, dataset="text:moved/renamed.jsonl:16", out="moved"))
        Path("edited.jsonl").write_bytes(original.replace(b"cat", b"dog"))
        with pytest.raises(StoreMismatchError, match="was not dumped from dataset") as other:
            distill(DistillConfig(**common, dataset="text:edited.jsonl:16", out="edited"))
        one_line(other)
    finally:
        Path("moved/renamed.jsonl").rename(corpus)
    corpus.write_bytes(original.replace(b"cat", b"dog"))
    try:
        with pytest.raises(StoreMismatchError, match=r"changed since .* was dumped from it"):
            distill(DistillConfig(**common, out="changed"))
    finally:
        corpus.write_bytes(original)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edited.jsonl", "moved"]
    assert (tmp_path / "moved" / "config.json").is_file()


def test_a_resume_matches_the_text_by_content_even_as_an_older_release_recorded_it(
    tmp_path, lm_files, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(lm_files["corpus"], data / "corpus.jsonl")
    out = tmp_path / "r.zarr"
    lm_teachers.FOLDER = str(lm_files["teacher"])
    options: dict[str, Any] = dict(
        teacher="lm_teachers:flaky", out=str(out), batch_size=8, chunk_rows=40
    )
    lm_teachers.FAIL_AFTER = 3
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**options, dataset=f"text:{data / 'corpus.jsonl'}:16"))
    finally:
        lm_teachers.FAIL_AFTER = None
    # Releases before this one recorded the path as typed, relative to where the dump ran.
    recorded = kdcache_record(zarr.open_group(str(out), mode="r"))["dataset"]
    as_previous_release(out, dataset={**recorded, "spec": "text:corpus.jsonl:16"})

    monkeypatch.chdir(tmp_path)
    resumed = dump_lm(DumpConfig(**options, dataset="text:data/corpus.jsonl:16", resume=True))
    assert 0 < resumed.rows_computed < resumed.num_tokens
    store = open_sequence_store(out)
    assert store.metadata.dataset["spec"] == "text:corpus.jsonl:16"
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    dataset = build_text_dataset(
        "text:data/corpus.jsonl:16", split="train", tokenizer=teacher.tokenizer
    )
    assert [store.tokens(i).tolist() for i in range(store.num_sequences)] == [
        tokens.tolist() for tokens in dataset.sequences
    ]


def test_overwrite_replaces_a_token_store_only_once_the_new_one_is_complete(tmp_path, lm_files):
    corpus, out = lm_files["corpus"], tmp_path / "t.zarr"
    lm_teachers.FOLDER = str(lm_files["teacher"])
    base: dict[str, Any] = dict(teacher="lm_teachers:flaky", out=str(out), batch_size=8)
    dump_lm(DumpConfig(**base, dataset=f"text:{corpus}:16", chunk_rows=40))
    before = open_sequence_store(out)
    rows = dense(before.read(np.arange(before.num_sequences)))

    with pytest.raises(SpecError, match="more than the 64 positions") as refused:
        dump_lm(DumpConfig(**base, dataset=f"text:{corpus}:65", overwrite=True))
    one_line(refused)
    replacement: dict[str, Any] = dict(**base, dataset=f"text:{corpus}:8", chunk_rows=24)
    lm_teachers.FAIL_AFTER = 2
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**replacement, overwrite=True))
    finally:
        lm_teachers.FAIL_AFTER = None
    kept = open_sequence_store(out)
    assert kept.metadata.generation == before.metadata.generation
    assert np.array_equal(kept.offsets, before.offsets)
    assert torch.equal(dense(kept.read(np.arange(kept.num_sequences))), rows)
    assert verify_store(out).ok

    finished = dump_lm(DumpConfig(**replacement, resume=True))  # completes the replacement
    assert 0 < finished.rows_computed < finished.num_tokens
    after = open_sequence_store(out)
    assert after.metadata.generation != before.metadata.generation
    assert after.num_sequences > before.num_sequences
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    dataset = build_text_dataset(f"text:{corpus}:8", split="train", tokenizer=teacher.tokenizer)
    assert after.lengths.tolist() == [len(tokens) for tokens in dataset.sequences]
    assert after.tokens(7).tolist() == dataset.sequences[7].tolist()
    assert verify_store(out).ok
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t.zarr"]


def test_a_resume_with_another_batch_size_is_refused(tmp_path, lm_files):
    out = tmp_path / "b.zarr"
    lm_teachers.FOLDER = str(lm_files["teacher"])
    options: dict[str, Any] = dict(
        teacher="lm_teachers:flaky", out=str(out), dataset=f"text:{lm_files['corpus']}:16"
    )
    lm_teachers.FAIL_AFTER = 3
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**options, batch_size=8, chunk_rows=40))
    finally:
        lm_teachers.FAIL_AFTER = None
    before = sorted((path.name, path.stat().st_size) for path in out.rglob("*"))
    with pytest.raises(StoreMismatchError, match=r"teacher\.batch_size is 8 but this dump has 4"):
        dump_lm(DumpConfig(**options, batch_size=4, chunk_rows=40, resume=True))
    assert sorted((path.name, path.stat().st_size) for path in out.rglob("*")) == before
