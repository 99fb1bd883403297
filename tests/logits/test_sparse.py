"""The sparse teacher form: tail statistics, their interpolation to any T, and reconstruction."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.logits.sparse import (
    KNOT_TEMPERATURES,
    SparseLogits,
    interpolate_tail_logit,
    tail_statistics,
)


def peaked_logits(rows: int = 64, classes: int = 200, seed: int = 0) -> torch.Tensor:
    """A few large logits over a Gaussian tail, like a confident classifier's."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=gen) * 2
    logits[:, :3] += torch.tensor([12.0, 8.0, 6.0])
    return logits


def split(logits: torch.Tensor, k: int) -> SparseLogits:
    values, indices = logits.topk(k, dim=1)
    return SparseLogits(values, indices, tail_statistics(logits, indices), logits.shape[1])


def true_tail_logit(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    tail = logits.double().sort(dim=1, descending=True).values[:, k:]
    return temperature * (torch.logsumexp(tail / temperature, dim=1) - math.log(tail.shape[1]))


def test_statistics_are_the_tail_max_mean_and_exact_effective_logits():
    logits = peaked_logits()
    stats = tail_statistics(logits, logits.topk(5, dim=1).indices)
    tail = logits.sort(dim=1, descending=True).values[:, 5:]
    torch.testing.assert_close(stats[:, 0], tail.max(dim=1).values)
    torch.testing.assert_close(stats[:, 1], tail.mean(dim=1), atol=1e-5, rtol=0)
    for column, temperature in enumerate(KNOT_TEMPERATURES, start=2):
        torch.testing.assert_close(
            stats[:, column].double(), true_tail_logit(logits, 5, temperature), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("temperature", KNOT_TEMPERATURES)
def test_interpolation_is_exact_at_the_knots(temperature):
    logits = peaked_logits()
    sparse = split(logits, 5)
    torch.testing.assert_close(
        sparse.tail_logit(temperature), sparse.tail[:, 2 + KNOT_TEMPERATURES.index(temperature)]
    )


@pytest.mark.parametrize("temperature", [1.5, 3.0, 6.0, 16.0, 100.0])
def test_tail_mass_between_and_beyond_the_knots(temperature):
    logits = peaked_logits()
    got = split(logits, 5).tail_logit(temperature).double()
    # An error e in z(T) scales the tail's mass by exp(e / T).
    relative_mass_error = ((got - true_tail_logit(logits, 5, temperature)) / temperature).abs()
    assert relative_mass_error.max() < 0.01


@pytest.mark.parametrize("temperature", [0.25, 0.5, 0.8])
def test_below_one_the_tail_mass_is_extrapolated_within_a_small_absolute_error(temperature):
    # Below T = 1 the tail holds little mass; what matters is its error in probability.
    logits = peaked_logits()
    sparse = split(logits, 5)
    true_mass = 1 - torch.softmax(logits.double() / temperature, 1).topk(5, 1).values.sum(1)
    got_mass = sparse.log_probs(temperature)[1].double().exp()
    assert (got_mass - true_mass).abs().max() < 2e-3


def test_effective_tail_logit_runs_from_max_to_mean():
    sparse = split(peaked_logits(), 5)
    temperatures = [0.05, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 50, 1e4]
    curve = torch.stack([sparse.tail_logit(t) for t in temperatures], dim=1)
    assert (curve[:, 1:] <= curve[:, :-1] + 1e-5).all()  # decreasing in T
    assert (curve <= sparse.tail[:, :1] + 1e-5).all()
    assert (curve >= sparse.tail[:, 1:2] - 1e-5).all()
    torch.testing.assert_close(curve[:, -1], sparse.tail[:, 1], atol=1e-2, rtol=0)
    # Near T = 0 only the largest tail logit counts: z(T) ~ max - T log(n).
    torch.testing.assert_close(
        curve[:, 0].double(), true_tail_logit(peaked_logits(), 5, 0.05), atol=0.05, rtol=0
    )


@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0, 8.0])
def test_dense_reconstruction_keeps_the_top_k_and_the_tail_mass(temperature):
    logits = peaked_logits()
    sparse = split(logits, 5)
    dense = sparse.dense(temperature)
    assert dense.shape == logits.shape
    torch.testing.assert_close(dense.gather(1, sparse.indices), sparse.values)
    top_log_probs, tail_log_mass = sparse.log_probs(temperature)
    torch.testing.assert_close(
        torch.log_softmax(dense / temperature, dim=1).gather(1, sparse.indices), top_log_probs
    )
    torch.testing.assert_close(
        torch.logsumexp(torch.cat([top_log_probs, tail_log_mass[:, None]], 1), 1),
        torch.zeros(64),
        atol=1e-6,
        rtol=0,
    )
    entropy = -torch.special.xlogy(
        torch.softmax(dense / temperature, 1), torch.softmax(dense / temperature, 1)
    ).sum(1)
    torch.testing.assert_close(sparse.entropy(temperature), entropy, atol=1e-5, rtol=1e-5)


def test_interpolate_rejects_nothing_it_should_not():
    # Rows with all tail logits equal have a flat curve at that value.
    stats = torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    for temperature in (0.3, 1.0, 5.0, 20.0):
        torch.testing.assert_close(
            interpolate_tail_logit(stats, temperature, 10), torch.tensor([2.0])
        )


def test_rows_slices_and_cat_keep_every_row_as_a_batch():
    sparse = split(peaked_logits(rows=6, classes=20), 4)
    rows = sparse.rows()
    assert len(rows) == len(sparse) == 6
    assert all(row.shape == (1, 20) for row in rows)
    assert sparse[2].shape == (1, 20)
    assert sparse[-1].shape == (1, 20)
    assert sparse[1:4].shape == (3, 20)
    again = SparseLogits.cat([rows[3], rows[0], sparse[-1]])
    torch.testing.assert_close(again.dense(4.0), sparse.dense(4.0)[[3, 0, 5]])
