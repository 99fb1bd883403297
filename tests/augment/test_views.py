"""ViewDataset: student-only augmentation drawn in bulk per epoch gives each item its own record."""

from __future__ import annotations

import torch

from kdcache.augment.recipe import STUDENT_STREAM, parse_recipe
from kdcache.augment.views import ViewDataset, ViewSource
from kdcache.data.datasets import build_dataset

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
