"""Colour jitter, grayscale, blur and erasing: torchvision's distributions, exact replay, pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kdcache.augment.ops import PixelScale
from kdcache.augment.photometric import JITTER_ORDERS
from kdcache.augment.recipe import parse_recipe
from kdcache.errors import SpecError

N = 100_000
SIZE = (20, 30)


def table(spec: str, n: int = N, size: tuple[int, int] = SIZE) -> np.ndarray:
    return parse_recipe(spec).sample_table(seed=7, num_samples=n, views=1, size=size)[:, 0]


def image(channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(channels, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_jitter_factors_are_uniform_in_torchvisions_ranges_and_orders_uniform():
    records = table("jitter:0.4,0.3,0.2,0.1").astype(np.float64)
    orders = np.bincount(records[:, 0].astype(int), minlength=24)
    assert len(orders) == 24
    assert np.abs(orders / N - 1 / 24).max() < 0.003
    for column, (low, high) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)], 1):
        values = records[:, column]
        assert values.min() >= np.float32(low)
        assert values.max() <= np.float32(high)
        assert values.mean() == pytest.approx((low + high) / 2, abs=0.002)
        assert values.var() == pytest.approx((high - low) ** 2 / 12, rel=0.02)


def test_jitter_replays_as_torchvisions_color_jitter():
    recipe = parse_recipe("jitter:0.4,0.4,0.4,0.1")
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    records = recipe.sample_table(seed=0, num_samples=6, views=2, size=SIZE).reshape(12, -1)
    for record in records:
        b, c, s, h = (float(v) for v in record[1:])
        params = {
            "fn_idx": torch.tensor(JITTER_ORDERS[int(record[0])]),
            "brightness_factor": b,
            "contrast_factor": c,
            "saturation_factor": s,
            "hue_factor": h,
        }
        assert torch.equal(recipe.apply(image(), record), jitter.transform(image(), params))


def test_jitter_leaves_out_the_adjustments_of_zero_strength():
    recipe = parse_recipe("jitter:brightness=0.5")
    assert recipe.fields == ("jitter_order", "jitter_brightness")
    record = recipe.sample(seed=0, index=0, view=0, num_samples=1, size=SIZE)
    assert torch.equal(
        recipe.apply(image(), record), TF.adjust_brightness(image(), float(record[1]))
    )


def test_gray_is_bernoulli_p_and_keeps_the_channels():
    assert table("gray:0.2")[:, 0].mean() == pytest.approx(0.2, abs=0.006)  # 4.7 standard errors
    recipe = parse_recipe("gray:1")
    view = recipe.apply(image(), np.array([1], dtype=np.float32))
    assert torch.equal(view, TF.rgb_to_grayscale(image(), num_output_channels=3))
    assert torch.equal(recipe.apply(image(), np.array([0], dtype=np.float32)), image())
    assert torch.equal(recipe.apply(image(1), np.array([1], dtype=np.float32)), image(1))


def test_blur_draws_sigma_uniformly_and_applies_with_p():
    sigma = table("blur:5,sigma=0.5-1.5,p=0.3")[:, 0].astype(np.float64)
    assert (sigma == 0).mean() == pytest.approx(0.7, abs=0.005)
    blurred = sigma[sigma > 0]
    assert blurred.min() >= 0.5
    assert blurred.max() <= 1.5
    assert blurred.mean() == pytest.approx(1.0, abs=0.005)
    recipe = parse_recipe("blur:5")
    record = np.array([0.8], dtype=np.float32)
    expected = TF.gaussian_blur(image(), [5, 5], [float(record[0])] * 2)
    assert torch.equal(recipe.apply(image(), record), expected)


@pytest.mark.parametrize("size", [(20, 30), (6, 5)])
def test_erase_boxes_follow_torchvisions_get_params(size):
    # On a tiny image many boxes do not fit: retries and the no-op shape the distribution.
    height, width = size
    records = table("erase:1", n=20_000, size=size)
    torch.manual_seed(0)
    erasing = v2.RandomErasing(p=1.0)
    theirs = []
    for _ in range(20_000):
        params = erasing.make_params([torch.zeros(3, *size)])
        erased = params["v"] is not None and params["h"] * params["w"] > 0
        theirs.append((params["h"], params["w"]) if erased else (0, 0))
    reference = np.array(theirs, dtype=np.float64)
    for column, name in enumerate(["height", "width"]):
        a, b = records[:, 2 + column].astype(np.float64), reference[:, column]
        standard_error = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * standard_error, name
        assert ((a == 0).mean()) == pytest.approx((b == 0).mean(), abs=0.02), name
    top, left, h, w = records.T
    assert (top + h <= height).all()
    assert (left + w <= width).all()
    assert (h < height).all()
    assert (w < width).all()


def test_erase_writes_its_box_with_constant_or_seeded_noise():
    constant = parse_recipe("erase:1,value=0.5")
    record = np.array([2, 3, 5, 7], dtype=np.float32)
    view = constant.apply(image(), record)
    assert (view[:, 2:7, 3:10] == 0.5).all()
    outside = torch.ones(SIZE, dtype=torch.bool)
    outside[2:7, 3:10] = False
    assert torch.equal(view[:, outside], image()[:, outside])
    noisy = parse_recipe("erase:1,value=random")
    first = noisy.apply(image(), np.array([2, 3, 5, 7, 11], dtype=np.float32))
    again = noisy.apply(image(), np.array([2, 3, 5, 7, 11], dtype=np.float32))
    other = noisy.apply(image(), np.array([2, 3, 5, 7, 12], dtype=np.float32))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    noise = first[:, 2:7, 3:10]
    assert noise.std() == pytest.approx(1.0, abs=0.3)
    assert torch.equal(noisy.apply(image(), np.zeros(5, dtype=np.float32)), image())
    assert (table("erase:0.25,value=random")[:, 2] > 0).mean() == pytest.approx(0.25, abs=0.01)


def test_colour_operations_run_on_pixels_and_the_rest_on_inputs():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    scale = PixelScale(mean, std)
    pixels = image()
    inputs = TF.normalize(pixels, list(mean), list(std))
    recipe = parse_recipe("flip:1+gray:1+erase:1,value=0")
    record = np.array([1, 1, 2, 3, 5, 7], dtype=np.float32)
    view = recipe.apply(inputs, record, scale=scale)
    gray = TF.rgb_to_grayscale(TF.horizontal_flip(pixels), num_output_channels=3)
    expected = TF.normalize(gray, list(mean), list(std))
    expected[:, 2:7, 3:10] = 0  # erasing writes on the normalised inputs
    torch.testing.assert_close(view, expected)
    assert not torch.allclose(recipe.apply(inputs, record), expected)  # without the scale


def test_a_blur_window_wider_than_the_input_is_refused_before_any_view():
    recipe = parse_recipe("blur:17")
    recipe.sample_table(seed=0, num_samples=2, views=1, size=(9, 9))
    with pytest.raises(
        SpecError, match=r"blur:17 needs inputs of more than 8 pixels a side, got 8 x 8"
    ):
        recipe.sample_table(seed=0, num_samples=2, views=1, size=(8, 8))
