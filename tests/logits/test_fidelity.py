"""Fidelity of encodings: KL to the true softmax at T = 1, 2, 4, 8 and top-1 agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from narrowing import present

from kdcache.errors import ConfigError
from kdcache.logits.encodings import parse_encoding
from kdcache.logits.fidelity import (
    MAX_MEASURED_ROWS,
    Fidelity,
    FidelityAccumulator,
    kl_divergence,
    measure_fidelity,
    sample_stride,
    sparse_kl_divergence,
)


def logits(rows: int = 200, classes: int = 50, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, classes)) * 3).astype(np.float32)


def test_kl_divergence_is_zero_for_equal_logits_and_matches_the_definition():
    true = torch.from_numpy(logits(8, 5))
    assert kl_divergence(true, true + 7.0, 2.0).abs().max() < 1e-12  # softmax ignores shifts
    other = true.flip(1)
    p, q = torch.softmax(true.double() / 2, 1), torch.softmax(other.double() / 2, 1)
    torch.testing.assert_close(kl_divergence(true, other, 2.0), (p * (p / q).log()).sum(1))


def test_finer_encodings_are_more_faithful():
    block = logits()
    results = {
        name: measure_fidelity(block, parse_encoding(name, num_classes=50))
        for name in ("float32", "float16", "int8", "topk:10", "topk:3")
    }
    assert results["float32"].mean_kl == (0.0, 0.0, 0.0, 0.0)
    assert results["float32"].top1_agreement == 1.0
    for temperature in (1.0, 2.0, 4.0, 8.0):
        kls = [
            results[name].kl_at(temperature) for name in ("float16", "int8", "topk:10", "topk:3")
        ]
        assert kls == sorted(kls)
        assert kls[0] < 1e-5
    assert results["topk:3"].top1_agreement == 1.0
    assert results["topk:3"].num_samples == 200


def test_accumulator_counts_only_sampled_and_kept_rows():
    block = logits(16, 6)
    encoding = parse_encoding("int8")
    accumulator = FidelityAccumulator(encoding, sample_every=4)
    assert accumulator.result() is None
    keep = np.ones(16, dtype=bool)
    keep[8] = False
    accumulator.update(block, encoding.encode(block), indices=np.arange(16), keep=keep)
    result = present(accumulator.result())
    assert result.num_samples == 3  # rows 0, 4, 12
    rows = [0, 4, 12]
    assert result.kl_at(4.0) == pytest.approx(measure_fidelity(block[rows], encoding).kl_at(4.0))
    assert Fidelity.from_dict(result.to_dict()) == result


def test_measure_fidelity_refuses_an_empty_block():
    with pytest.raises(ConfigError, match=r"\(0, 4\)"):
        measure_fidelity(np.zeros((0, 4), dtype=np.float32), parse_encoding("float16"))


def test_sparse_kl_equals_the_kl_to_the_dense_reconstruction():
    block = logits(32, 40)
    encoding = parse_encoding("topk:6", num_classes=40)
    sparse = present(encoding.sparse(encoding.encode(block)))
    true = torch.from_numpy(block)
    for temperature in (0.5, 1.0, 3.0, 8.0):
        torch.testing.assert_close(
            sparse_kl_divergence(true, sparse, temperature),
            kl_divergence(true, sparse.dense(temperature), temperature),
            atol=1e-6,
            rtol=1e-5,
        )


def test_the_writer_measures_every_8th_row_and_at_most_about_65k_rows():
    assert sample_stride(1_000) == 8
    assert sample_stride(MAX_MEASURED_ROWS * 8) == 8
    big = 1_281_167 * 16  # ImageNet with 16 views
    assert sample_stride(big) > 8
    assert big / sample_stride(big) <= MAX_MEASURED_ROWS


def test_accumulated_fidelity_does_not_depend_on_the_order_of_blocks():
    block = logits(96, 30)
    encoding = parse_encoding("topk:4", num_classes=30)
    results = []
    for order in (range(12), reversed(range(12))):
        accumulator = FidelityAccumulator(encoding)
        for part in order:
            rows = block[part * 8 : part * 8 + 8]
            accumulator.update(rows, encoding.encode(rows))
        results.append(accumulator.result())
    assert results[0] == results[1]
