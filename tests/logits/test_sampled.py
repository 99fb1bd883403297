"""``draw_samples``: the draws a ``sampled:S`` store keeps must not change with the code that
draws them (a resumed dump recomputes batches and must store the same bytes). ``draw_rows``, the
draws taken where the teacher ran: the same arrays and distribution, fixed by each row's index."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdcache.logits import sampled
from kdcache.logits.sampled import draw_rows, draw_samples, row_uniforms


def _block() -> np.ndarray:
    rng = np.random.default_rng(20)
    return (-np.log1p(np.arange(5000)) + 2 * rng.standard_normal((30, 5000))).astype(np.float32)


def test_draws_match_those_of_the_whole_block_at_once_golden():
    """The draws are those of the code before rows were drawn in blocks (main e4d4fa7, torch
    2.14; 30 rows of 5,000 classes span three blocks here), stored in ascending id order since
    c8c01b0 (checked then against that code's most-drawn-first rows: the same classes and
    counts in every row, at S = 7, 12 and 64, both schemes)."""
    classes, counts = draw_samples(_block(), 12)
    assert classes[0].tolist() == [1, 10, 108, 117, 366, 720, 2309, 3567, 3567, 3567, 3567, 3567]
    assert counts[0].tolist() == [4, 1, 1, 1, 2, 1, 1, 1, 0, 0, 0, 0]
    digest = hashlib.sha256(classes.astype(np.int64).tobytes() + counts.tobytes()).hexdigest()
    assert digest == "9bbf04b33adf3163aebf9169166df92ade0666b65dab9b1d1e9323f2610e3a6f"


def test_rows_hold_distinct_ascending_classes_then_padding_that_repeats_the_last():
    """The order the store's id codec needs (it writes the gaps between ascending ids and a
    trailing run once); every row's counts still sum to S."""
    for scheme in ("multinomial", "systematic"):
        classes, counts = draw_samples(_block(), 64, scheme=scheme)
        assert (counts.sum(axis=1) == 64).all()
        for row_classes, row_counts in zip(classes, counts, strict=True):
            drawn = row_counts > 0
            kept = row_classes[drawn]
            assert drawn[: drawn.sum()].all()  # the padding comes last
            assert (np.diff(kept) > 0).all()
            assert (row_classes[~drawn] == kept[-1]).all()


def test_draws_do_not_depend_on_the_block_size(monkeypatch):
    classes, counts = draw_samples(_block(), 7)
    monkeypatch.setattr(sampled, "DRAW_BLOCK_ELEMENTS", 1)  # one row at a time
    one_by_one = draw_samples(_block(), 7)
    np.testing.assert_array_equal(classes, one_by_one[0])
    np.testing.assert_array_equal(counts, one_by_one[1])


def test_systematic_draws_are_floor_or_ceil_of_s_p_and_unbiased():
    """Each class is drawn floor(S p) or ceil(S p) times (a class with p >= 1 / S is never
    missed), and the mean share over many rows of one distribution is p."""
    logits = np.repeat(_block()[:1, :50], 3000, axis=0)
    logits += np.arange(3000, dtype=np.float32)[:, None] * 1e-3  # rows differ, same softmax
    classes, counts = draw_samples(logits, 12, scheme="systematic")
    assert (counts.sum(axis=1) == 12).all()
    dense = np.zeros((len(classes), 50))
    np.add.at(dense, (np.arange(len(classes))[:, None], classes), counts)
    p = torch.softmax(torch.from_numpy(_block()[0, :50]).double(), dim=0).numpy()
    assert (dense >= np.floor(12 * p) - 1e-9).all()
    assert (dense <= np.ceil(12 * p) + 1e-9).all()
    np.testing.assert_allclose(dense.mean(axis=0) / 12, p, atol=0.01)
    again = draw_samples(logits, 12, scheme="systematic")  # seeded by the block, as multinomial
    np.testing.assert_array_equal(classes, again[0])


def _one_distribution(num_rows: int, num_classes: int = 50) -> tuple[torch.Tensor, np.ndarray]:
    """``num_rows`` rows of one softmax (rows differ by a constant) and that softmax."""
    row = torch.from_numpy(_block()[0, :num_classes])
    logits = row[None, :] + torch.arange(num_rows, dtype=torch.float32)[:, None] * 1e-3
    return logits, torch.softmax(row.double(), dim=0).numpy()


def _shares(classes: torch.Tensor, counts: torch.Tensor, num_classes: int) -> np.ndarray:
    dense = np.zeros((len(classes), num_classes))
    np.add.at(dense, (np.arange(len(classes))[:, None], classes.numpy()), counts.numpy())
    return dense


def test_device_draws_hold_the_arrays_the_host_draws_hold():
    block = torch.from_numpy(_block())
    for scheme in ("multinomial", "systematic"):
        classes, counts, _ = draw_rows(block, torch.arange(30) + 10**12, 64, scheme=scheme)
        assert classes.dtype == torch.int64
        assert counts.dtype == torch.uint8
        assert (counts.sum(dim=1) == 64).all()
        for row_classes, row_counts in zip(classes.numpy(), counts.numpy(), strict=True):
            drawn = row_counts > 0
            kept = row_classes[drawn]
            assert drawn[: drawn.sum()].all()
            assert (np.diff(kept) > 0).all()
            assert (row_classes[~drawn] == kept[-1]).all()


def test_device_draws_of_a_row_depend_on_its_index_only(monkeypatch):
    """Whatever batch, order or block size draws a row, its classes are the same."""
    block, rows = torch.from_numpy(_block()), torch.arange(100, 130)
    classes, counts, _ = draw_rows(block, rows, 12)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(sampled, "DEVICE_DRAW_BLOCK_ELEMENTS", 1)  # one row at a time
    shuffled = draw_rows(block[order], rows[order], 12)
    np.testing.assert_array_equal(shuffled[0].numpy(), classes[order].numpy())
    np.testing.assert_array_equal(shuffled[1].numpy(), counts[order].numpy())
    other_rows = draw_rows(block, rows + 30, 12)
    assert not torch.equal(other_rows[0], classes)


def test_row_uniforms_are_uniform_and_differ_between_rows_and_draws():
    uniforms = row_uniforms(torch.arange(2**40, 2**40 + 20_000), 8)
    assert uniforms.dtype == torch.float64
    assert (uniforms >= 0).all()
    assert (uniforms < 1).all()
    assert len(torch.unique(uniforms)) == uniforms.numel()
    histogram = torch.histc(uniforms, bins=20, min=0, max=1)
    expected = uniforms.numel() / 20
    assert ((histogram - expected) ** 2 / expected).sum() < 60  # chi-square, 19 dof: p < 1e-5
    correlation = torch.corrcoef(torch.stack([uniforms[:, 0], uniforms[:, 1]]))[0, 1]
    assert abs(float(correlation)) < 0.03


def test_device_draws_are_unbiased_for_both_schemes():
    """The mean share of each class over many rows of one distribution is p, within 4.5
    standard errors of the draws (classes expected often enough for the normal limit)."""
    logits, p = _one_distribution(4000)
    for scheme in ("multinomial", "systematic"):
        classes, counts, _ = draw_rows(logits, torch.arange(4000), 12, scheme=scheme)
        shares = _shares(classes, counts, 50) / 12
        error = shares.mean(axis=0) - p
        standard_error = np.sqrt(p * (1 - p) / (12 * 4000))
        frequent = p * 12 * 4000 >= 200
        assert (np.abs(error[frequent]) < 4.5 * standard_error[frequent]).all(), scheme
        if scheme == "systematic":
            dense = _shares(classes, counts, 50)
            assert (dense >= np.floor(12 * p) - 1e-9).all()
            assert (dense <= np.ceil(12 * p) + 1e-9).all()


def test_rows_2_to_the_32_apart_draw_apart():
    """Both words of a row's index reach its uniforms (a store of 4.3 billion tokens and more)."""
    rows = torch.arange(5, 10)
    assert not torch.equal(row_uniforms(rows, 4), row_uniforms(rows + 2**32, 4))
    assert not torch.equal(row_uniforms(rows, 4), row_uniforms(rows + 2**62, 4))
    assert row_uniforms(torch.zeros(1, dtype=torch.int64), 1).item() > 1e-6


def test_a_class_of_probability_zero_is_never_drawn_even_at_the_last_uniform(monkeypatch):
    """At the largest uniform below 1 (and a systematic point that rounds up to 1), the draw is
    the last class of positive probability, not a class the softmax gives 0."""
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.standard_normal((4, 1000)).astype(np.float32))
    logits[:, -3:] = -1e4  # exp underflows to 0 in float64
    logits[1, 1:] = -1e4  # all the mass on class 0
    last_uniform = 1.0 - 2.0**-53
    monkeypatch.setattr(
        sampled,
        "row_uniforms",
        lambda rows, count: torch.full((len(rows), count), last_uniform, dtype=torch.float64),
    )
    for scheme, draws in (("multinomial", 3), ("systematic", 255)):
        classes, counts, finite = draw_rows(logits, torch.arange(4), draws, scheme=scheme)
        assert finite.all()
        assert classes[1, 0] == 0
        assert counts[1, 0] == draws
        assert (classes[counts > 0] < 997).all(), scheme
