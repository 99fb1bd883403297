"""Dumping a causal LM into a sequence store: exact float32 rows, top-k, resume after a crash."""

from __future__ import annotations

from typing import Any

import lm_teachers
import numpy as np
import pytest
import torch
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from narrowing import dense, present

from kdcache.config import DumpConfig
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset, collate
from kdcache.logits.encodings import parse_encoding
from kdcache.logits.sparse import SparseLogits
from kdcache.store.sequence import open_sequence_store


def teacher_rows(lm, dataset, sample):
    batch = collate(dataset, [sample], pad_id=lm.tokenizer.eos_token_id)
    with torch.no_grad():
        return lm.logits(batch.input_ids, batch.attention_mask)[batch.mask]


def test_float32_rows_are_the_teachers_logits_and_the_store_records_its_fingerprint(
    tmp_path, lm_files
):
    spec = f"text:{lm_files['corpus']}:16"
    result = dump_lm(
        DumpConfig(
            teacher=f"hf:{lm_files['teacher']}",
            dataset=spec,
            out=str(tmp_path / "t.zarr"),
            encoding="float32",
            batch_size=8,
        )
    )
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    dataset = build_text_dataset(spec, split="train", tokenizer=teacher.tokenizer)
    store = open_sequence_store(tmp_path / "t.zarr")
    assert result.num_tokens == store.num_tokens == dataset.num_tokens == result.rows_computed
    assert result.bytes_per_token
    assert result.tokens_per_s > 0
    for sample in (0, 5, len(dataset) - 1):
        assert torch.equal(dense(store.read([sample])), teacher_rows(teacher, dataset, sample))
        assert store.tokens(sample).tolist() == dataset.sequences[sample].tolist()
    record = store.metadata.dataset["fingerprint"]
    assert record["tokenizer"]["special_tokens"]["eos_token"] == "<|endoftext|>"
    assert record["max_length"] == 16
    assert record["tokens"]["num_samples"] == len(dataset)
    assert store.metadata.teacher["weights_sha256"]


def test_topk_store_keeps_the_full_vocabulary_tail(tmp_path, lm_files):
    spec = f"text:{lm_files['corpus']}:16"
    dump_lm(
        DumpConfig(
            teacher=f"hf:{lm_files['teacher']}",
            dataset=spec,
            out=str(tmp_path / "k.zarr"),
            encoding="topk:8",
            batch_size=16,
        )
    )
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    dataset = build_text_dataset(spec, split="train", tokenizer=teacher.tokenizer)
    store = open_sequence_store(tmp_path / "k.zarr")
    rows = store.read([3, 1])
    assert isinstance(rows, SparseLogits)
    full = torch.cat([teacher_rows(teacher, dataset, 3), teacher_rows(teacher, dataset, 1)])
    encoding = parse_encoding("topk:8", num_classes=teacher.vocab_size)
    want = present(encoding.sparse(encoding.encode(full.numpy())))
    assert torch.equal(rows.indices, want.indices)
    assert torch.equal(rows.tail, want.tail)
    assert store.metadata.fidelity["top1_agreement"] == 1.0


def test_rows_reduced_where_the_teacher_runs_store_what_the_host_encoding_stores(
    tmp_path, lm_files, monkeypatch
):
    """The path a GPU dump takes (topk:K rows reduced on the device), forced here on the CPU."""
    import zarr
    from narrowing import zarr_array

    from kdcache.lm import dump as lm_dump

    options: dict[str, Any] = dict(
        teacher=f"hf:{lm_files['teacher']}",
        dataset=f"text:{lm_files['corpus']}:16",
        encoding="topk:8",
        batch_size=8,
    )
    host = dump_lm(DumpConfig(**options, out=str(tmp_path / "host.zarr")))
    monkeypatch.setattr(lm_dump, "reduces_on", lambda device, encoding: True)
    reduced = dump_lm(DumpConfig(**options, out=str(tmp_path / "reduced.zarr")))
    assert host.fidelity is not None
    assert reduced.fidelity is not None
    assert reduced.fidelity.mean_kl == pytest.approx(host.fidelity.mean_kl, rel=1e-3)
    stores = [zarr.open_group(tmp_path / name, mode="r") for name in ("host.zarr", "reduced.zarr")]
    for name in ("row_max", "topk_offsets", "topk_indices"):
        host_rows, reduced_rows = (np.asarray(zarr_array(group, name)[:]) for group in stores)
        np.testing.assert_array_equal(host_rows, reduced_rows)
    # The tail statistics are float64 sums in torch's order rather than numpy's: this random
    # teacher's nearly flat rows put a few of their float16 values one unit in the last place
    # apart (a different order of summation; no reduction can avoid it), never more.
    host_tail, reduced_tail = (
        np.asarray(zarr_array(group, "tail")[:]).view(np.int16) for group in stores
    )
    apart = np.abs(host_tail.astype(np.int32) - reduced_tail)
    assert apart.max() <= 1
    assert (apart > 0).mean() < 0.05


def test_rows_drawn_where_the_teacher_runs_do_not_depend_on_the_batches(
    tmp_path, lm_files, monkeypatch
):
    """The path a GPU dump of sampled:S takes (draws on the device), forced here on the CPU: a
    row's draws are fixed by its index, so two batch sizes store the same bytes."""
    import zarr
    from narrowing import zarr_array

    from kdcache.lm import dump as lm_dump

    monkeypatch.setattr(lm_dump, "reduces_on", lambda device, encoding: True)
    results = {
        size: dump_lm(
            DumpConfig(
                teacher=f"hf:{lm_files['teacher']}",
                dataset=f"text:{lm_files['corpus']}:16",
                encoding="sampled:5",
                batch_size=size,
                out=str(tmp_path / f"b{size}.zarr"),
            )
        )
        for size in (8, 3)
    }
    assert results[8].fidelity == results[3].fidelity
    assert results[8].fidelity is not None
    stores = [zarr.open_group(tmp_path / f"b{size}.zarr", mode="r") for size in results]
    for name in ("sample_indices", "sample_counts"):
        first, second = (np.asarray(zarr_array(group, name)[:]) for group in stores)
        np.testing.assert_array_equal(first, second)
    counts = np.asarray(zarr_array(stores[0], "sample_counts")[:])
    assert (counts.astype(int).sum(axis=-1) == 5).all()


def test_resume_after_a_crash_computes_only_the_rest_and_equals_a_full_dump(tmp_path, lm_files):
    spec = f"text:{lm_files['corpus']}:16"
    lm_teachers.FOLDER = str(lm_files["teacher"])
    options: dict[str, Any] = dict(
        teacher="lm_teachers:flaky",
        dataset=spec,
        out=str(tmp_path / "r.zarr"),
        encoding="float32",
        batch_size=8,
        chunk_rows=40,
    )
    lm_teachers.FAIL_AFTER = 5
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**options))
    finally:
        lm_teachers.FAIL_AFTER = None
    resumed = dump_lm(DumpConfig(**options, resume=True))
    assert 0 < resumed.rows_computed < resumed.num_tokens
    full = dump_lm(DumpConfig(**{**options, "out": str(tmp_path / "full.zarr")}))
    assert full.rows_computed == full.num_tokens
    a, b = open_sequence_store(tmp_path / "r.zarr"), open_sequence_store(tmp_path / "full.zarr")
    everything = np.arange(a.num_sequences)
    assert torch.equal(dense(a.read(everything)), dense(b.read(everything)))
