"""inspect_store on real stores: identity, sizes, teacher accuracy and entropy, fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from narrowing import present

from kdcache import create_store
from kdcache.store.format.layout import store_nbytes
from kdcache.store.sequence import create_sequence_store
from kdcache.store.tools.report import format_report, inspect_store


def write_store(path, encoding, *, finalize=True):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 8
    logits = rng.normal(size=(40, 8)).astype(np.float32)
    logits[np.arange(40), labels] += 6.0
    logits[:10, 0] += 20.0  # the teacher says 0 on rows 0-9: wrong except rows 0 and 8 (label 0)
    writer = create_store(
        path,
        num_samples=40,
        num_classes=8,
        encoding=encoding,
        labels=labels,
        chunk_rows=20,
        teacher={"spec": "cnn:8", "weights_sha256": "ab" * 32},
        dataset={"spec": "digits", "split": "train"},
    )
    writer.write(np.arange(20 if not finalize else 40), logits[: 20 if not finalize else 40])
    if finalize:
        writer.finalize()
    return logits


@pytest.mark.parametrize("encoding", ["float32", "topk:3"])
def test_report_of_a_complete_store(tmp_path, encoding):
    logits = write_store(tmp_path / "s.zarr", encoding)
    report = inspect_store(tmp_path / "s.zarr")
    assert (report.num_samples, report.num_classes, report.encoding, report.complete) == (
        40,
        8,
        encoding,
        True,
    )
    assert present(report.teacher)["spec"] == "cnn:8"
    assert present(report.dataset)["spec"] == "digits"
    assert report.bytes_on_disk == store_nbytes(tmp_path / "s.zarr")
    assert report.bytes_per_sample == pytest.approx(present(report.bytes_on_disk) / 40)
    assert report.compression_ratio == pytest.approx(40 * 8 * 4 / present(report.bytes_on_disk))
    assert report.teacher_accuracy == pytest.approx(100 * 32 / 40)
    assert set(present(report.mean_entropy)) == {"1.0", "4.0"}
    assert present(report.fidelity)["num_samples"] == 5
    if encoding == "float32":
        for temperature in (1.0, 4.0):
            p = torch.softmax(torch.from_numpy(logits).double() / temperature, 1)
            assert present(report.mean_entropy)[str(temperature)] == pytest.approx(
                -(p * p.log()).sum(1).mean().item()
            )
    text = format_report(report)
    for fragment in (
        "samples (N):      40",
        "teacher accuracy: 80.00% vs stored labels",
        "classes (C):      8",
        "spec=cnn:8, weights_sha256=abababababab…",
        "complete:         yes",
    ):
        assert fragment in text


def test_report_of_an_interrupted_store(tmp_path):
    write_store(tmp_path / "s.zarr", "float16", finalize=False)
    report = inspect_store(tmp_path / "s.zarr")
    assert not report.complete
    assert report.written_fraction == 0.5
    assert report.teacher_accuracy is None
    assert report.mean_entropy is None
    assert report.fidelity is None
    assert "no (50% of chunks written)" in format_report(report)


def test_report_of_a_token_store_speaks_of_sequences_tokens_and_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 16, size=n) for n in (5, 9, 4)]  # 4 + 8 + 3 = 15 token rows
    targets = np.concatenate([tokens[1:] for tokens in sequences])
    logits = rng.normal(size=(15, 16)).astype(np.float32)
    logits[np.arange(15), targets] += 10.0
    logits[:7, 0] += 30.0  # predicts token 0 at rows 0-6: right only where the next token is 0
    writer = create_sequence_store(tmp_path / "lm.zarr", sequences=sequences, vocab_size=16)
    writer.write([0, 1, 2], logits)
    writer.finalize()
    report = inspect_store(tmp_path / "lm.zarr")
    assert report.sequence == {"num_sequences": 3, "num_tokens": 15, "max_length": 9}
    correct = 8 + int((targets[:7] == 0).sum())
    assert report.teacher_accuracy == pytest.approx(100 * correct / 15)
    text = format_report(report)
    for fragment in (
        "sequences:        3 (up to 9 tokens each)",
        "tokens (N):       15 (next-token rows)",
        "vocabulary (C):   16",
        " B/token)",
        f"teacher accuracy: {100 * correct / 15:.2f}% of next tokens predicted (top-1)",
    ):
        assert fragment in text, text
    for image_word in ("samples", "classes", "views", "B/sample"):
        assert image_word not in text, text
