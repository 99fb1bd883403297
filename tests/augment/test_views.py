"""ViewDataset: student-only augmentation drawn in bulk per epoch gives each item its own record;
ViewSource: every stored view record is range-checked before it is replayed."""

from __future__ import annotations

import re

import pytest
import torch

from kdcache.augment.recipe import STUDENT_STREAM, parse_recipe
from kdcache.augment.views import ViewDataset, ViewSource
from kdcache.data.datasets import build_dataset
from kdcache.errors import StoreCorruptError

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
    with pytest.raises(StoreCorruptError, match=re.escape(expected)):
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
