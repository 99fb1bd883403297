"""Image-folder class names: recorded in the store, shown by inspect and its figure, accepted by
--exclude-classes."""

from __future__ import annotations

import click
import numpy as np
import pytest
import torch
from narrowing import present
from test_datasets import _png_tree

from kdcache import DistillConfig, DumpConfig
from kdcache.cli.commands import cli
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError
from kdcache.plots.figures import _per_class_accuracy, new_figure, plot_distributions, plot_store
from kdcache.store.read.reader import open_store
from kdcache.store.tools.report import format_report, inspect_store
from kdcache.train.transfer import transfer_rows


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "val"):
        _png_tree(root, split, classes=("eight", "one"))
    out = root / "teacher.zarr"
    dump_teacher(DumpConfig(teacher="cnn:4", dataset=f"imagefolder:{root}:16", out=str(out)))
    return out


def test_the_store_records_the_folders_class_names(folder_store, tmp_path):
    reader = open_store(folder_store)
    assert reader.class_names == ["eight", "one"]
    report = format_report(inspect_store(folder_store))
    assert "2 (0=eight, 1=one)" in next(line for line in report.splitlines() if "classes" in line)
    figure = new_figure(width=4, height=3)
    axes = figure.subplots()
    _per_class_accuracy(axes, np.array([0, 1, 1]), np.array([0, 1, 0]), 2, "train", ["a", "b"])
    assert [label.get_text() for label in axes.get_xticklabels()] == ["a", "b"]
    assert plot_store(reader, tmp_path / "store.png").stat().st_size > 0
    logits = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    names = reader.class_names
    assert (
        plot_distributions(
            logits, logits, [0, 1], tmp_path / "d.png", temperature=2.0, class_names=names
        )
        .stat()
        .st_size
        > 0
    )


def test_exclude_classes_takes_names_or_indices(folder_store):
    dataset = build_dataset(present(open_store(folder_store).metadata.dataset)["spec"])

    def rows(*classes):
        config = DistillConfig(student="mlp", cache="s", out="o", exclude_classes=classes)
        return present(transfer_rows(config, dataset)).tolist()

    assert rows("eight") == rows(0) == [3, 4, 5]
    with pytest.raises(ConfigError, match="the transfer set is empty"):
        rows("one", 0)
    with pytest.raises(
        ConfigError, match=r"class 'two' but dataset .* has classes 0 to 1 or eight, one"
    ):
        rows("two")
    option = next(p for p in cli.commands["distill"].params if p.name == "exclude_classes")
    parsed = option.process_value(click.Context(cli.commands["distill"]), "eight,1")
    assert parsed == ("eight", 1)
