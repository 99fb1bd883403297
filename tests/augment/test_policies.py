"""RandAugment, TrivialAugmentWide, AutoAugment: torchvision's tables, draws and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kdcache.augment.policies import (
    AUTO_AUGMENT,
    IMAGENET_POLICY,
    RAND_AUGMENT,
    TRANSFORMS,
    TRIVIAL_AUGMENT_WIDE,
    apply_transform,
    magnitude_table,
)
from kdcache.augment.recipe import parse_recipe

N = 100_000
SIZE = (24, 40)


def table(spec: str, n: int = N) -> np.ndarray:
    return parse_recipe(spec).sample_table(seed=3, num_samples=n, views=1, size=SIZE)[:, 0]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (RAND_AUGMENT, v2.RandAugment),
        (AUTO_AUGMENT, v2.AutoAugment),
        (TRIVIAL_AUGMENT_WIDE, v2.TrivialAugmentWide),
    ],
)
@pytest.mark.parametrize("bins", [10, 11, 31])
def test_the_magnitude_tables_are_torchvisions(ours, theirs, bins):
    space = theirs._AUGMENTATION_SPACE
    assert list(ours) == list(space)
    for name, (magnitudes, signed) in ours.items():
        their_magnitudes, their_signed = space[name]
        assert signed == their_signed, name
        mine, reference = magnitudes(bins, *SIZE), their_magnitudes(bins, *SIZE)
        assert (mine is None) == (reference is None), name
        if mine is not None:
            assert torch.equal(mine, reference), name


def test_the_imagenet_policy_is_torchvisions():
    assert list(IMAGENET_POLICY) == v2.AutoAugment()._policies


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_each_transform_replays_as_torchvisions(transform):
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    magnitudes = magnitude_table("autoaugment", 10, SIZE)[TRANSFORMS.index(transform)]
    augmenter = v2.RandAugment()
    signed = transform in AUTO_AUGMENT and AUTO_AUGMENT[transform][1]
    for magnitude in {
        float(magnitudes[3]),
        (-1) ** signed * float(magnitudes[7]),
        float(magnitudes[9]),
    }:
        expected = augmenter._apply_image_or_video_transform(
            image,
            transform,
            magnitude,
            interpolation=v2.InterpolationMode.NEAREST,
            fill=augmenter._fill,
        )
        assert torch.equal(apply_transform(image, transform, magnitude), expected), magnitude


def test_randaugment_picks_its_transforms_uniformly_at_the_fixed_magnitude():
    records = table("randaugment:2,9")
    magnitudes = magnitude_table("randaugment", 31, SIZE)
    for slot in (0, 2):
        ops = records[:, slot].astype(int)
        counts = np.bincount(ops, minlength=len(TRANSFORMS))
        allowed = [TRANSFORMS.index(name) for name in RAND_AUGMENT]
        assert counts[[i for i in range(len(TRANSFORMS)) if i not in allowed]].sum() == 0
        assert np.abs(counts[allowed] / N - 1 / 14).max() < 0.004
        magnitude = records[:, slot + 1].astype(np.float64)
        np.testing.assert_array_equal(np.abs(magnitude), magnitudes[ops, 9])
        rotated = ops == TRANSFORMS.index("Rotate")
        assert (magnitude[rotated] < 0).mean() == pytest.approx(0.5, abs=0.02)
        posterized = ops == TRANSFORMS.index("Posterize")
        assert (magnitude[posterized] == 7).all()  # 8 - round(9 / 7.5), never negated
    assert not np.array_equal(records[:, 0], records[:, 2])  # the slots are drawn apart


def test_trivialaugment_draws_the_magnitude_bin_uniformly():
    records = table("trivialaugment")
    ops = records[:, 0].astype(int)
    rotated = ops == TRANSFORMS.index("Rotate")
    angles = np.abs(records[rotated, 1].astype(np.float64))
    bins = np.searchsorted(
        magnitude_table("trivialaugment", 31, SIZE)[TRANSFORMS.index("Rotate")], angles
    )
    counts = np.bincount(bins, minlength=31)
    assert np.abs(counts / rotated.sum() - 1 / 31).max() < 0.01
    assert rotated.mean() == pytest.approx(1 / 14, abs=0.004)


def test_autoaugment_applies_each_transform_with_its_probability():
    records = table("autoaugment")
    policy = records[:, 0].astype(int)
    assert np.abs(np.bincount(policy, minlength=25) / N - 1 / 25).max() < 0.004
    for slot in range(2):
        ops = records[:, 1 + 2 * slot].astype(int)
        for index, sub_policy in enumerate(IMAGENET_POLICY):
            name, probability, _ = sub_policy[slot]
            chosen = policy == index
            applied = ops[chosen] == TRANSFORMS.index(name)
            assert applied.mean() == pytest.approx(probability, abs=0.05)
            assert (ops[chosen][~applied] == 0).all()  # Identity where not applied
            assert (records[chosen][~applied, 2 + 2 * slot] == 0).all()


def test_a_policy_record_replays_its_transforms_in_order():
    recipe = parse_recipe("randaugment:3,20")
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(1))
    record = recipe.sample(seed=0, index=4, view=1, num_samples=8, size=SIZE)
    expected = image
    for op, magnitude in record.reshape(3, 2):
        expected = apply_transform(expected, TRANSFORMS[int(op)], float(magnitude))
    assert torch.equal(recipe.apply(image, record), expected)
