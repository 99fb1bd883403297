"""The views figure on a real store of mixed views, read back as an image."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_png
from PIL import Image

from kdcache import augment_record, create_store, open_store, parse_recipe
from kdcache.data.datasets import build_dataset
from kdcache.plots.views import plot_views


@pytest.mark.parametrize("spec", ["flip", "flip+mixup:1", "cutmix:1"])
def test_the_views_figure_of_a_store(tmp_path, spec):
    dataset = build_dataset("fake:6:8:3")
    recipe = parse_recipe(spec)
    params = recipe.sample_table(seed=0, num_samples=6, views=2, size=(8, 8))
    writer = create_store(
        tmp_path / "v.zarr",
        num_samples=6,
        num_classes=3,
        views=2,
        view_params=params,
        augment=augment_record(recipe, seed=0, size=(8, 8)),
        labels=dataset.labels,
    )
    writer.write(np.arange(12), np.random.default_rng(0).normal(size=(12, 3)))
    writer.finalize()
    path = plot_views(open_store(tmp_path / "v.zarr"), dataset, tmp_path / "views.png", samples=2)
    assert_png(path, min_size=(500, 400))
    with Image.open(path) as image:  # taller rows carry lambda and the partner when mixing
        assert image.size == (570, 500 if recipe.mixes else 420)
