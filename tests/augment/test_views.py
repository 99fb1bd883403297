"""ViewDataset: student-only augmentation drawn in bulk per epoch gives each item its own record;
ViewSource: every stored view record is range-checked before it is replayed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from kdcache.augment.recipe import STUDENT_STREAM, parse_recipe
from kdcache.augment.views import ViewDataset, ViewSource, augment_record, recorded_recipe
from kdcache.data.datasets import build_dataset
from kdcache.data.datasets.labeled import ArrayDataset, LabeledDataset
from kdcache.data.pixels import PixelNormalization
from kdcache.errors import StoreCorruptError, StoreMismatchError

DATASET = "fake:40:8:4"  # 40 images of (3, 8, 8)


def test_student_augmentation_replays_each_items_own_record():
    dataset = build_dataset(DATASET)
    stored = parse_recipe("rrc:scale=0.5-1,size=6+flip")
    source = ViewSource(
        dataset, stored, stored.sample_table(seed=1, num_samples=40, views=2, size=(8, 8))
    )
    student = parse_recipe("pad-crop:1+flip")
    views = ViewDataset(dataset, source, student=student, student_seed=9)
    for epoch, sample, view in [(0, 3, 1), (2, 39, 0), (0, 0, 0), (2, 3, 1)]:
        image, label = views[epoch * views.num_rows + sample * 2 + view]
        # The record drawn alone, for the stored view's size (6 x 6): the same bits.
        record = student.sample(
            seed=9, index=sample, view=epoch, num_samples=40, size=(6, 6), stream=STUDENT_STREAM
        )
        expected = student.apply(source.view(sample, view), record)
        assert label == dataset[sample][1]
        assert torch.equal(image, expected)
    # Another epoch, another record: the item of epoch 5 differs from epoch 0's.
    assert not torch.equal(views[3 * 2 + 1][0], views[5 * views.num_rows + 3 * 2 + 1][0])


@pytest.mark.parametrize(
    ("recipe", "field", "value", "expected"),
    [
        ("rrc+flip", "crop_top", 1000, "crop_top = 1000, expected a crop inside the image"),
        ("rrc+flip", "crop_width", 0, "crop_width = 0, expected an integer from 1 to 8"),
        ("rrc+flip", "flip", 2, "flip = 2, expected 0 or 1"),
        ("rrc+flip", "crop_left", 0.5, "crop_left = 0.5, expected a crop inside the image"),
        ("pad-crop:1+flip", "pad_left", 3, "pad_left = 3, expected an integer from 0 to 2"),
        ("flip+mixup:0.2", "partner", -1, "partner = -1, expected another sample's index"),
        ("flip+mixup:0.2", "partner", 6, "partner = 6, expected another sample's index"),
        ("flip+mixup:0.2", "lam", 5, "lam = 5, expected from 0 to 1"),
        ("flip+cutmix:1", "box_top", 7, "box_top = 7, expected a box inside the image"),
        ("rrc+mixup:0.2", "partner_crop_top", 1000, "partner_crop_top = 1000, expected a crop"),
        (
            "jitter:0.4+flip",
            "jitter_order",
            24,
            "jitter_order = 24, expected an integer from 0 to 23",
        ),
        ("jitter:0.4", "jitter_contrast", 1.5, "jitter_contrast = 1.5, expected from 0.6 to 1.4"),
        ("jitter:hue=0.1", "jitter_hue", -0.2, "jitter_hue = -0.2, expected from -0.1 to 0.1"),
        ("gray:0.5", "gray", 0.5, "gray = 0.5, expected 0 or 1"),
        ("blur:3", "blur_sigma", 3, "blur_sigma = 3, expected 0 or from 0.1 to 2"),
        ("randaugment:2,9", "ra_op_2", 14, "ra_op_2 = 14, expected a transform this policy picks"),
        ("randaugment:2,9", "ra_op_1", 0.5, "ra_op_1 = 0.5, expected a transform this policy"),
        (
            "randaugment:2,9",
            "ra_magnitude_1",
            0.125,
            "ra_magnitude_1 = 0.125, expected a magnitude",
        ),
        ("trivialaugment", "ta_op", 15, "ta_op = 15, expected a transform this policy picks"),
        ("trivialaugment", "ta_magnitude", 1e6, "ta_magnitude = 1e+06, expected a magnitude"),
        ("autoaugment", "aa_policy", 25, "aa_policy = 25, expected an integer from 0 to 24"),
        ("autoaugment", "aa_op_2", 99, "aa_op_2 = 99, expected a transform this policy picks"),
        ("autoaugment", "aa_magnitude_1", 77, "aa_magnitude_1 = 77, expected a magnitude"),
        ("erase:1", "erase_height", 8, "erase_height = 8, expected 0, or a box inside the image"),
        ("erase:1", "erase_left", 7.5, "erase_height = .*, expected 0, or a box inside the image"),
        ("erase:1,value=random", "erase_noise", -1, "erase_noise = -1, expected an integer"),
        ("flip+randaugment:1,5+mixup:0.2", "partner_ra_op", 99, "partner_ra_op = 99, expected"),
    ],
)
def test_view_records_out_of_range_are_refused_naming_the_sample_and_view(
    recipe, field, value, expected
):
    dataset = build_dataset("fake:6:8:4")
    parsed = parse_recipe(recipe)
    params = parsed.sample_table(seed=0, num_samples=6, views=2, size=(8, 8))
    ViewSource(dataset, parsed, params)  # the drawn records pass
    params[4, 1, parsed.fields.index(field)] = value
    with pytest.raises(StoreCorruptError, match=r"s\.zarr's view_params: view 1 of sample 4 has "):
        ViewSource(dataset, parsed, params, described="s.zarr's view_params")
    with pytest.raises(
        StoreCorruptError, match=expected if ".*" in expected else re.escape(expected)
    ):
        ViewSource(dataset, parsed, params)


def test_a_view_mixed_with_itself_is_refused_unless_it_is_the_only_sample():
    parsed = parse_recipe("flip+mixup:0.2")
    params = parsed.sample_table(seed=0, num_samples=6, views=2, size=(8, 8))
    params[2, 0, parsed.fields.index("partner")] = 2
    with pytest.raises(StoreCorruptError, match="view 0 of sample 2 has partner = 2"):
        ViewSource(build_dataset("fake:6:8:4"), parsed, params)
    alone = parsed.sample_table(seed=0, num_samples=1, views=2, size=(8, 8))
    assert (alone[:, :, parsed.fields.index("partner")] == 0).all()
    ViewSource(build_dataset("fake:1:8:4"), parsed, alone)


def test_only_recipes_with_the_newer_operations_record_their_layout():
    # Records of the first five operations stay as stores wrote them before layouts were
    # numbered, so those stores still resume.
    assert "ops_version" not in augment_record(
        parse_recipe("rrc+flip+mixup:0.2"), seed=0, size=(8, 8)
    )
    record = augment_record(parse_recipe("deit"), seed=0, size=(8, 8))
    assert record["ops_version"] == 2
    assert recorded_recipe(record, where="s.zarr") == parse_recipe("deit")
    assert recorded_recipe({"recipe": "pad-crop:2+flip"}, where="s.zarr").spec == "pad-crop:2+flip"


@pytest.mark.parametrize(
    ("record", "error", "message"),
    [
        (
            {"recipe": "rrc+gray"},
            StoreCorruptError,
            "needs view-parameter layout 2 but the store records layout 1",
        ),
        (
            {"recipe": "rrc", "ops_version": 3},
            StoreMismatchError,
            "layout 3 but this kdcache reads up to 2; upgrade",
        ),
        (
            {"recipe": "rrc", "ops_version": "2"},
            StoreCorruptError,
            "augment.ops_version = '2', expected an integer",
        ),
        ({"recipe": "rrc", "ops_version": 0}, StoreCorruptError, "augment.ops_version = 0"),
    ],
)
def test_a_layout_this_kdcache_cannot_read_is_refused_in_one_line(record, error, message):
    with pytest.raises(error, match=f"^s\\.zarr.*{message}"):
        recorded_recipe(record, where="s.zarr")


def test_colour_operations_see_the_pixels_behind_a_normalised_dataset():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    pixels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = TF.normalize(pixels, list(mean), list(std))
    labels = np.zeros(4, dtype=np.int64)
    dataset = LabeledDataset(
        ArrayDataset(inputs.numpy(), labels),
        spec="normalised",
        split="train",
        num_classes=2,
        in_channels=3,
        transform_description="test",
        labels=labels,
        normalization=PixelNormalization(255.0, mean, std),
    )
    recipe = parse_recipe("gray:1")
    source = ViewSource(dataset, recipe, np.ones((4, 1, 1), dtype=np.float32))
    gray = TF.rgb_to_grayscale(pixels[2], num_output_channels=3)
    torch.testing.assert_close(source.view(2, 0), TF.normalize(gray, list(mean), list(std)))
    # Gray of the normalised inputs themselves would be another image.
    assert not torch.allclose(source.view(2, 0), TF.rgb_to_grayscale(inputs[2], 3))
