"""A store, a dataset and a sweep folder stay bound: stored labels and store identity checked."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kdcache import DistillConfig, create_store
from kdcache.config import SweepConfig
from kdcache.data.datasets import build_dataset
from kdcache.errors import KdcacheError, StoreMismatchError
from kdcache.train.loop import distill
from kdcache.train.sweep import run_sweep


def api_store(path, labels, value=0.0, overwrite=False):
    """A digits store built through the Python API: labels, but no dataset fingerprint."""
    writer = create_store(
        path,
        num_samples=len(labels),
        num_classes=10,
        encoding="float32",
        labels=labels,
        dataset={"spec": "digits", "split": "train"},
        overwrite=overwrite,
    )
    writer.write(np.arange(len(labels)), np.full((len(labels), 10), value))
    writer.finalize()
    return path


def test_stored_labels_are_compared_even_without_a_fingerprint(tmp_path):
    labels = build_dataset("digits").labels
    store = api_store(tmp_path / "s.zarr", np.roll(labels, 1))
    with pytest.raises(StoreMismatchError, match="holds other labels than dataset 'digits'"):
        distill(DistillConfig(student="mlp:8", cache=str(store), out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_a_sweep_folder_belongs_to_one_store(tmp_path):
    labels = build_dataset("digits").labels
    first = api_store(tmp_path / "a.zarr", labels)
    second = api_store(tmp_path / "b.zarr", labels, value=1.0)
    options: dict[str, Any] = dict(
        student="mlp:8", out=str(tmp_path / "sw"), temperatures=(4.0,), epochs=1
    )
    run_sweep(SweepConfig(cache=str(first), device="cpu", **options))
    with pytest.raises(KdcacheError) as refused:
        run_sweep(SweepConfig(cache=str(second), device="cpu", **options))
    assert f"its runs were distilled from {first}, not {second}; " in str(refused.value)
    assert run_sweep(SweepConfig(cache=str(first), device="cpu", **options)).runs_skipped == 1
    api_store(first, labels, value=2.0, overwrite=True)
    with pytest.raises(KdcacheError) as refused:
        run_sweep(SweepConfig(cache=str(first), device="cpu", **options))
    assert f"{first} was dumped again since its runs were trained; " in str(refused.value)
