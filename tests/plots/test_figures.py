"""Figures are valid image files written atomically; checked as files, not pixels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, assert_png
from PIL import Image

from kdcache import create_store, open_store
from kdcache.errors import ConfigError, KdcacheError
from kdcache.plots.figures import (
    epoch_position,
    plot_curves,
    plot_distributions,
    plot_store,
    plot_sweep,
    read_metrics,
)


def write_metrics(path, epochs, torn=False):
    lines = [
        json.dumps({"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_acc": 50 + 10 * e})
        for e in range(1, epochs + 1)
    ]
    path.write_text("\n".join(lines) + "\n" + ('{"epoch": ' if torn else ""))


def test_curves_from_a_metrics_file(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", 3, torn=True)
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert_png(plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", title="mlp"))


def test_curves_place_evaluations_within_epochs_at_their_fraction(tmp_path):
    """Records of --eval-every carry their epoch_progress; epochs' ends their epoch."""
    records = [
        {"epoch": 1, "epoch_progress": 0.5, "step": 2, "val_acc": 40.0},
        {"epoch": 1, "step": 4, "val_acc": 55.0},
        {"epoch": 2, "epoch_progress": 1.5, "step": 6, "val_acc": 70.0},
        {"epoch": 2, "step": 8, "val_acc": 65.0},
    ]
    lines = [json.dumps({"train_loss": 1.0, "val_loss": 0.9, **r}) for r in records]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [epoch_position(r) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        0.5,
        1.0,
        1.5,
        2.0,
    ]
    assert_png(plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png"))


@pytest.mark.parametrize("num_classes", [10, 50])
def test_distributions_show_the_label_even_outside_the_teacher_top_classes(tmp_path, num_classes):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, num_classes, generator=generator) * 3
    student = torch.randn(3, num_classes, generator=generator)
    least_likely = int(teacher[1].argmin())
    path = plot_distributions(
        teacher,
        student,
        [0, least_likely, 2],
        tmp_path / "d.png",
        temperature=4.0,
        sample_ids=[10, 20, 30],
    )
    assert_png(path)


def test_sweep_figure_with_several_seeds_and_a_single_one(tmp_path):
    rows = [
        {
            "loss": loss,
            "alpha": 0.7,
            "temperature": t,
            "seed": seed,
            "best_val_acc": 90 + t + seed,
            "final_val_acc": 89 + t,
        }
        for loss in ("kd", "focal")
        for t in (1.0, 4.0, 16.0)
        for seed in (0, 1)
    ]
    rows.append(
        {
            "loss": "kd",
            "alpha": 1.0,
            "temperature": 4.0,
            "seed": 0,
            "best_val_acc": 95,
            "final_val_acc": 94,
        }
    )
    assert_png(plot_sweep(rows, tmp_path / "sweep.png"))


@pytest.mark.parametrize(
    ("encoding", "with_labels"), [("float16", True), ("float16", False), ("topk:2", True)]
)
def test_store_figure(tmp_path, encoding, with_labels):
    logits = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32) * 4
    labels = logits.argmax(axis=1) if with_labels else None
    writer = create_store(
        tmp_path / "s.zarr",
        num_samples=40,
        num_classes=5,
        labels=labels,
        chunk_rows=16,
        encoding=encoding,
    )
    writer.write(np.arange(40), logits)
    writer.finalize()
    path = plot_store(open_store(tmp_path / "s.zarr"), tmp_path / "figures" / "store.png")
    assert_png(path)
    with Image.open(path) as image:  # no per-class panel, left blank, without labels
        assert image.size[0] == (1300 if with_labels else 900)


def test_unusable_figure_paths_are_refused(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", 2)
    with pytest.raises(ConfigError, match=r"\.png, \.pdf, \.svg"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.jpg")
    (tmp_path / "file").write_text("")
    with pytest.raises(KdcacheError, match="cannot write figure"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "file" / "curves.png")


def test_importing_kdcache_does_not_import_matplotlib():
    code = (
        "import sys, kdcache, kdcache.train.loop, kdcache.train.sweep; "
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
