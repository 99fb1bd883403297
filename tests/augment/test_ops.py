"""Drawn parameters follow the intended distributions (torchvision's for rrc) and stay in bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from kdcache.augment.recipe import parse_recipe

N = 200_000  # views per distribution check: standard errors ~ 0.1 % of the spread


def table(spec: str, *, size: tuple[int, int], n: int = N, views: int = 1) -> np.ndarray:
    return parse_recipe(spec).sample_table(seed=5, num_samples=n, views=views, size=size)[:, 0]


def test_rrc_area_share_and_log_ratio_are_uniform_when_every_box_fits():
    # Boxes of at most half the area and ratio within 4/3 always fit a square: no attempt fails,
    # so the area share is uniform on [0.08, 0.5] and the log-ratio uniform on +-log(4/3).
    size = (224, 224)
    top, left, h, w = table("rrc:scale=0.08-0.5,ratio=0.75-1.3333333", size=size).T
    share = h * w / (224 * 224)
    assert share.mean() == pytest.approx(0.29, abs=0.001)
    assert share.var() == pytest.approx(0.42**2 / 12, rel=0.02)
    log_ratio = np.log(w / h)
    assert log_ratio.mean() == pytest.approx(0.0, abs=0.001)
    assert log_ratio.var() == pytest.approx((2 * math.log(4 / 3)) ** 2 / 12, rel=0.02)
    # Offsets uniform over the positions that keep the box inside.
    assert ((top + 0.5) / (224 - h + 1)).mean() == pytest.approx(0.5, abs=0.003)
    assert ((left + 0.5) / (224 - w + 1)).mean() == pytest.approx(0.5, abs=0.003)


def test_rrc_with_failing_attempts_matches_torchvisions_get_params():
    # On a wide image the default recipe's large boxes often do not fit: retries and fallback
    # shape the distribution, which must be torchvision's.
    size = (20, 60)
    ours = table("rrc", size=size, n=40_000)[:, 2:]
    torch.manual_seed(0)
    image = torch.empty(1, *size)
    theirs = np.array(
        [
            RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])[2:]
            for _ in range(10_000)
        ],
        dtype=np.float64,
    )
    for column, name in enumerate(["height", "width"]):
        a, b = ours[:, column], theirs[:, column]
        standard_error = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * standard_error, name
        assert a.std() == pytest.approx(b.std(), rel=0.03), name


def test_rrc_falls_back_to_torchvisions_centre_crop():
    # Ratio 2-3 on a square never fits: every view is the centre crop of ratio 2.
    records = table("rrc:scale=1-1,ratio=2-3", size=(9, 9), n=50)
    assert (records == np.array([2, 0, 4, 9], dtype=np.float32)).all()  # round(9 / 2) = 4


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ("rrc", (7, 5)),
        ("rrc:scale=0.01-0.02", (3, 40)),
        ("rrc:scale=0.5-1,ratio=0.2-5,size=4", (16, 16)),
        ("rrc+flip+rrc", (11, 13)),
    ],
)
def test_every_crop_lies_inside_the_image(spec, size):
    height, width = size
    records = table(spec, size=size, n=20_000)
    for top, left, h, w in (records[:, :4].T, records[:, -4:].T):
        assert (h >= 1).all()
        assert (w >= 1).all()
        assert (top >= 0).all()
        assert (left >= 0).all()
        assert (top + h <= height).all()
        assert (left + w <= width).all()
        assert (records == np.round(records)).all()


def test_pad_crop_offsets_are_uniform_integers():
    records = table("pad-crop:3", size=(8, 8))
    for column in records.T:
        counts = np.bincount(column.astype(int), minlength=7)
        assert len(counts) == 7
        assert (np.abs(counts / N - 1 / 7) < 0.005).all()


def test_flip_is_bernoulli_p():
    assert table("flip:0.3", size=(4, 4))[:, 0].mean() == pytest.approx(0.3, abs=0.004)
    assert table("flip", size=(4, 4))[:, 0].mean() == pytest.approx(0.5, abs=0.004)
    assert set(table("flip:1", size=(4, 4), n=1000)[:, 0]) == {1.0}
    assert set(table("flip:0", size=(4, 4), n=1000)[:, 0]) == {0.0}


@pytest.mark.parametrize(("alpha", "n"), [(0.05, N), (0.2, N), (1.0, N), (2.0, 20_000)])
def test_mixup_lam_is_beta_alpha_alpha(alpha, n):
    # Jöhnk's method below 1, the inverse CDF from 1 up (and for rejected views).
    lam = table(f"mixup:{alpha}", size=(4, 4), n=n)[:, 1].astype(np.float64)
    variance = 1 / (4 * (2 * alpha + 1))
    standard_error = math.sqrt(variance / n)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert abs(lam.mean() - 0.5) < 4 * standard_error
    assert lam.var() == pytest.approx(variance, rel=0.03)
    # Beta(a, a) puts P(lam < 0.1) = I_0.1(a, a) below a tenth.
    from scipy.special import betainc

    assert (lam < 0.1).mean() == pytest.approx(betainc(alpha, alpha, 0.1), abs=0.01)


def test_the_partner_is_uniform_over_the_other_samples():
    views = 40_000
    partners = parse_recipe("mixup:1").sample_table(
        seed=0, num_samples=5, views=views, size=(4, 4)
    )[:, :, 0]
    for sample in range(5):
        counts = np.bincount(partners[sample].astype(int), minlength=5)
        assert counts[sample] == 0
        others = np.delete(counts, sample) / views
        assert (np.abs(others - 0.25) < 0.01).all()
    lone = parse_recipe("mixup:1").sample_table(seed=0, num_samples=1, views=3, size=(4, 4))
    assert (lone[0, :, 0] == 0).all()  # one sample: its own partner, as before


def test_cutmix_box_lies_inside_and_lam_is_its_complement():
    records = table("cutmix:1", size=(10, 14), n=50_000)
    lam, top, left, h, w = records[:, 1:].T
    assert (top >= 0).all()
    assert (left >= 0).all()
    assert (h >= 0).all()
    assert (w >= 0).all()
    assert (top + h <= 10).all()
    assert (left + w <= 14).all()
    np.testing.assert_allclose(lam, 1 - h * w / 140, rtol=1e-6)
    # Before clipping the box's area share is 1 - lam ~ U(0, 1); clipping only shrinks it.
    assert 0.5 < lam.mean() < 0.8
